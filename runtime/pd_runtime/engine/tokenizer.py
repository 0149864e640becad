"""Tokenizers for the engine: from a GGUF file's metadata or a Hugging Face tokenizer.json.

Both become a `FastTokenizer`: a `tokenizers.Tokenizer` (the Rust BPE Hugging Face uses) plus the
special token ids and the chat template, rendered with a sandboxed Jinja environment configured
as transformers configures its own (so templates written for transformers render the same).

A GGUF stores the vocabulary in byte-level spelling ("Ġthe"), the merges, the token types, and
the name of the pre-tokenizer llama.cpp applies (`tokenizer.ggml.pre`). The pre-tokenizer is
what llama.cpp does for that name (llama-vocab.cpp), which is also what the model's original
tokenizer.json does. transformers' GGUF loader differs for some names (for "smollm" it leaves
out the digit split, so "x  1" tokenizes differently); we follow llama.cpp and the original.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as RustTokenizer

# llama.cpp token types (llama_token_type / gguf.TokenType)
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class TokenizerError(ValueError):
    """A tokenizer that cannot be built, or a chat that cannot be rendered; says why."""


class ChatTemplateError(TokenizerError):
    """The chat template is missing, or rejected the messages (the client's error)."""


class Tokenizer(Protocol):
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True
    ) -> str: ...


class FastTokenizer:
    """A `tokenizers.Tokenizer` with its special tokens and chat template."""

    def __init__(
        self,
        backend: RustTokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
        pad_token_id: int | None = None,
        chat_template: str | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(dict.fromkeys(eos_token_ids))  # ordered, no repeats
        self.pad_token_id = pad_token_id
        self.chat_template = chat_template

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        """The prompt text for a chat; `extra` goes to the template (tools, documents, ...)."""
        if not self.chat_template:
            raise ChatTemplateError("this model has no chat template; use /v1/completions")
        _check_messages(messages)
        context = {"tools": None, "documents": None, **self._special_token_strings(), **extra}
        return render_chat_template(self.chat_template, messages, add_generation_prompt, context)

    def _special_token_strings(self) -> dict[str, str | None]:
        def text(token_id: int | None) -> str | None:
            return None if token_id is None else self.id_to_token(token_id)

        eos = self.eos_token_ids[0] if self.eos_token_ids else None
        return {"bos_token": text(self.bos_token_id), "eos_token": text(eos),
                "pad_token": text(self.pad_token_id)}


class IncrementalDetokenizer:
    """Text deltas of a growing token sequence that never split a UTF-8 character.

    Decodes a short window of recent tokens twice (without and with the new ones) and emits the
    difference, holding back while the text ends in a partial character (U+FFFD), as vLLM does.
    The window starts a few tokens back so that decoders that depend on the previous token
    (a leading space, a byte-level sequence) see their context.
    """

    CONTEXT_TOKENS = 5

    def __init__(self, tok: Tokenizer, prompt_ids: Sequence[int],
                 skip_special_tokens: bool = True) -> None:
        self.tok = tok
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_ids)
        self.read_offset = len(self.ids)
        self.prefix_offset = max(len(self.ids) - self.CONTEXT_TOKENS, 0)

    def push(self, token_id: int) -> str:
        """The new text this token completes (possibly "" while a character is incomplete)."""
        self.ids.append(token_id)
        prefix = self._decode(self.prefix_offset, self.read_offset)
        full = self._decode(self.prefix_offset, len(self.ids))
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]

    def flush(self) -> str:
        """Whatever is held back at the end of the sequence (an incomplete character as U+FFFD)."""
        prefix = self._decode(self.prefix_offset, self.read_offset)
        full = self._decode(self.prefix_offset, len(self.ids))
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):] if len(full) > len(prefix) else ""

    def _decode(self, start: int, end: int) -> str:
        return self.tok.decode(self.ids[start:end], skip_special_tokens=self.skip_special_tokens)


# --- chat templates ------------------------------------------------------------------------------


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool,
                         context: Mapping[str, Any]) -> str:
    import jinja2

    try:
        compiled = _compile_template(template)
        return str(compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   **context))
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as e:  # includes the sandbox's SecurityError
        raise ChatTemplateError(f"chat template failed: {e}") from e
    except (TypeError, KeyError, AttributeError, ValueError) as e:
        raise ChatTemplateError(f"chat template failed on these messages: {e}") from e


@lru_cache(maxsize=16)
def _compile_template(template: str) -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # transformers' settings: trim_blocks + lstrip_blocks, loop controls, tojson, raise_exception
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"chat template rejected the messages: {message}")


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError("messages must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ChatTemplateError(f"messages[{i}] must be an object with a string 'role'")


# --- GGUF metadata -------------------------------------------------------------------------------


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (`bytes_to_unicode`)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _byte_level() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _digits_then_bytes() -> pre_tokenizers.PreTokenizer:
    # llama.cpp: "\p{N}" then the GPT-2 regex; the models' tokenizer.json: Digits + ByteLevel
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level()])


# tokenizer.ggml.pre -> the pre-tokenizer llama.cpp applies for it (llama-vocab.cpp)
PRE_TOKENIZERS = {
    **dict.fromkeys(("default", "gpt-2", "gpt2", "mpt", "olmo", "jais"), _byte_level),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"),
                    _digits_then_bytes),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "smaug-bpe", "dbrx"),
                    lambda: _split_then_bytes(LLAMA3_SPLIT)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2"),
                    lambda: _split_then_bytes(QWEN2_SPLIT)),
}


def tokenizer_from_gguf_metadata(metadata: Mapping[str, Any]) -> FastTokenizer:
    """A byte-level BPE tokenizer from `tokenizer.ggml.*` keys (llama.cpp's model "gpt2")."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise TokenizerError(f"tokenizer.ggml.model {kind!r} is not supported "
                             "(supported: 'gpt2', byte-level BPE)")
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise TokenizerError(f"tokenizer.ggml.pre {pre!r} is not supported "
                             f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})")
    tokens = list(metadata.get("tokenizer.ggml.tokens") or [])
    merges = list(metadata.get("tokenizer.ggml.merges") or [])
    types = list(metadata.get("tokenizer.ggml.token_type") or [])
    if not tokens or not merges:
        raise TokenizerError("GGUF metadata lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
    for key, values, kind in (("tokens", tokens, str), ("merges", merges, str),
                              ("token_type", types, int)):
        if not all(isinstance(v, kind) for v in values):
            raise TokenizerError(f"tokenizer.ggml.{key} holds a value that is not {kind.__name__}")
    backend = _byte_level_bpe(tokens, merges)
    backend.pre_tokenizer = PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    _add_typed_tokens(backend, tokens, types)

    def token_id(key: str) -> int | None:
        value = metadata.get(f"tokenizer.ggml.{key}")
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(tokens):
            raise TokenizerError(f"tokenizer.ggml.{key} = {value!r} is outside the vocabulary")
        return value

    bos = token_id("bos_token_id")
    eos = [i for i in (token_id(k) for k in ("eos_token_id", "eot_token_id", "eom_token_id"))
           if i is not None]
    add_bos = bos if metadata.get("tokenizer.ggml.add_bos_token") else None
    add_eos = eos[0] if eos and metadata.get("tokenizer.ggml.add_eos_token") else None
    _set_post_processor(backend, tokens, add_bos, add_eos)
    return FastTokenizer(backend, bos_token_id=bos, eos_token_ids=eos,
                         pad_token_id=token_id("padding_token_id"),
                         chat_template=metadata.get("tokenizer.chat_template"))


def _byte_level_bpe(tokens: list[str], merges: list[str]) -> RustTokenizer:
    alphabet = byte_level_alphabet()
    letters = set(alphabet.values())
    # A token outside the byte alphabet (a raw "\n" some converters write) is respelled in it.
    vocab = {
        token if set(token) <= letters else "".join(alphabet[b] for b in token.encode()): index
        for index, token in enumerate(tokens)
    }
    pairs = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise TokenizerError(f"malformed merge {merge!r} in tokenizer.ggml.merges")
        pairs.append((left, right))
    return RustTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))


def _add_typed_tokens(backend: RustTokenizer, tokens: list[str], types: list[int]) -> None:
    """Control tokens (<|im_start|>) match whole and are special; user-defined ones match whole.

    In a byte-level vocabulary a control token spelled outside the byte alphabet is a llama.cpp
    mislabel (transformers skips it too).
    """
    letters = set(byte_level_alphabet().values())
    control = [AddedToken(t, special=True, normalized=False)
               for t, kind in zip(tokens, types, strict=False)
               if kind == TOKEN_CONTROL and set(t) <= letters]
    user = [AddedToken(t, special=False, normalized=False)
            for t, kind in zip(tokens, types, strict=False) if kind == TOKEN_USER_DEFINED]
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)


def _set_post_processor(backend: RustTokenizer, tokens: list[str], bos: int | None,
                        eos: int | None) -> None:
    """BOS / EOS around the text when the file asks for them (tokenizer.ggml.add_bos_token)."""
    if bos is None and eos is None:
        return

    def template(sequence: str, type_id: int) -> list[str]:
        pieces = [f"{tokens[bos]}:{type_id}"] if bos is not None else []
        pieces.append(f"${sequence}:{type_id}")
        return pieces + ([f"{tokens[eos]}:{type_id}"] if eos is not None else [])

    specials = [(tokens[i], i) for i in dict.fromkeys(x for x in (bos, eos) if x is not None)]
    backend.post_processor = processors.TemplateProcessing(
        single=template("A", 0), pair=template("A", 0) + template("B", 1), special_tokens=specials)


# --- Hugging Face tokenizer.json -----------------------------------------------------------------


def load_tokenizer_json(path: str | Path) -> FastTokenizer:
    """A tokenizer from a Hugging Face directory (or its tokenizer.json).

    Special tokens and the chat template come from tokenizer_config.json (or chat_template.jinja /
    chat_template.json), the end-of-sequence ids also from generation_config.json and config.json.
    """
    file = Path(path)
    folder = file if file.is_dir() else file.parent
    if file.is_dir():
        file = file / "tokenizer.json"
    if not file.is_file():
        raise TokenizerError(f"{file}: no tokenizer.json")
    try:
        backend = RustTokenizer.from_file(str(file))
    except Exception as e:  # the Rust side raises plain Exception for a malformed file
        raise TokenizerError(f"{file}: not a valid tokenizer.json: {e}") from e
    tok_config = _read_json(folder / "tokenizer_config.json")
    gen_config = _read_json(folder / "generation_config.json")
    model_config = _read_json(folder / "config.json")

    def special_id(name: str) -> int | None:
        value = tok_config.get(name)
        text = value.get("content") if isinstance(value, dict) else value
        return backend.token_to_id(text) if isinstance(text, str) else None

    bos = special_id("bos_token")
    if bos is None and isinstance(model_config.get("bos_token_id"), int):
        bos = model_config["bos_token_id"]
    eos = [special_id("eos_token")]
    for source in (gen_config, model_config):
        value = source.get("eos_token_id")
        eos += value if isinstance(value, list) else [value]
    return FastTokenizer(backend, bos_token_id=bos,
                         eos_token_ids=[i for i in eos if isinstance(i, int)],
                         pad_token_id=special_id("pad_token"),
                         chat_template=_chat_template(folder, tok_config))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: not valid JSON: {e}") from e
    return data if isinstance(data, dict) else {}


def _chat_template(folder: Path, tok_config: dict) -> str | None:
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = tok_config.get("chat_template") or _read_json(folder / "chat_template.json").get(
        "chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None
