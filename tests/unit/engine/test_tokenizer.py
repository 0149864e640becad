"""The engine's tokenizer on a synthetic byte-level BPE vocabulary (fast, no model needed)."""

from __future__ import annotations

import json

import pytest

from pd_runtime.engine.tokenizer import (
    ChatTemplateError,
    FastTokenizer,
    IncrementalDetokenizer,
    Tokenizer,
    TokenizerError,
    load_tokenizer_json,
    tokenizer_from_gguf_metadata,
)
from tests.unit.engine.gguf_fixtures import CHAT_TEMPLATE, tokenizer_metadata, vocab_tokens

TOKENS, _ = vocab_tokens()
ID = {t: i for i, t in enumerate(TOKENS)}

TEXTS = [
    "hello world",
    "héllo wörld – naïve café",
    "emoji 🤗🚀👩‍👩‍👧 and 中文 日本語 한국어",
    "def f(x):\n    return x ** 2  # tab\there\n",
    "   runs   of    spaces\n\n\n\t\t",
    "",
    "12 + 34 = 46",
]


@pytest.fixture(scope="module")
def tok() -> FastTokenizer:
    return tokenizer_from_gguf_metadata(tokenizer_metadata())


def test_is_a_tokenizer(tok: FastTokenizer) -> None:
    assert isinstance(tok, FastTokenizer)
    as_protocol: Tokenizer = tok  # mypy checks the structural match
    assert as_protocol.bos_token_id == 1
    assert tok.eos_token_ids == (2,)
    assert tok.pad_token_id == 2
    assert tok.vocab_size == len(TOKENS)


def test_merges_apply(tok: FastTokenizer) -> None:
    assert tok.encode("hello world") == [ID["hello"], ID["Ġworld"]]


@pytest.mark.parametrize("text", TEXTS)
def test_decode_inverts_encode(tok: FastTokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_control_tokens_match_whole_and_are_special(tok: FastTokenizer) -> None:
    ids = tok.encode("<|im_start|>hello<|im_end|>")
    assert ids == [ID["<|im_start|>"], ID["hello"], ID["<|im_end|>"]]
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>hello<|im_end|>"
    assert tok.decode(ids) == "hello"


def test_smollm_isolates_digits_default_does_not() -> None:
    # the vocabulary has a "12" merge; llama.cpp's smollm pre-tokenizer never lets digits meet
    smollm = tokenizer_from_gguf_metadata(tokenizer_metadata())
    gpt2 = tokenizer_from_gguf_metadata(tokenizer_metadata(**{"tokenizer.ggml.pre": "default"}))
    assert smollm.encode("12") == [ID["1"], ID["2"]]
    assert gpt2.encode("12") == [ID["12"]]
    # whitespace before a digit: the run stays whole ("ĠĠ") with smollm, as in llama.cpp
    assert smollm.encode("x  1") == [ID["x"], ID["ĠĠ"], ID["1"]]
    assert gpt2.encode("x  1") == [ID["x"], ID["Ġ"], ID["Ġ"], ID["1"]]


def test_bos_added_only_when_the_file_asks() -> None:
    with_bos = tokenizer_from_gguf_metadata(
        tokenizer_metadata(**{"tokenizer.ggml.add_bos_token": True}))
    assert with_bos.encode("hello") == [1, ID["hello"]]
    assert with_bos.encode("hello", add_special_tokens=False) == [ID["hello"]]
    without = tokenizer_from_gguf_metadata(tokenizer_metadata())
    assert without.encode("hello") == [ID["hello"]]


def test_eos_ids_include_end_of_turn() -> None:
    tok = tokenizer_from_gguf_metadata(tokenizer_metadata(**{"tokenizer.ggml.eot_token_id": 0}))
    assert tok.eos_token_ids == (2, 0)


@pytest.mark.parametrize(("key", "value", "needle"), [
    ("tokenizer.ggml.model", "llama", "'llama'"),
    ("tokenizer.ggml.pre", "klingon", "'klingon'"),
    ("tokenizer.ggml.merges", [], "merges"),
    ("tokenizer.ggml.eos_token_id", 10**6, "eos_token_id"),
    ("tokenizer.ggml.merges", ["nospace"], "nospace"),
])
def test_unsupported_metadata_is_named(key: str, value: object, needle: str) -> None:
    with pytest.raises(TokenizerError, match=needle):
        tokenizer_from_gguf_metadata(tokenizer_metadata(**{key: value}))


# --- chat template -------------------------------------------------------------------------------


def test_chat_template_renders(tok: FastTokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(messages)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert not tok.apply_chat_template(messages, add_generation_prompt=False).endswith(
        "assistant\n")


def test_chat_template_sees_special_tokens_and_tojson() -> None:
    template = "{{ bos_token }}{{ messages | tojson }}{{ eos_token }}"
    tok = tokenizer_from_gguf_metadata(tokenizer_metadata(**{"tokenizer.chat_template": template}))
    text = tok.apply_chat_template([{"role": "user", "content": "é"}])
    assert text == '<|im_start|>[{"role": "user", "content": "é"}]<|im_end|>'


def test_chat_template_trims_blocks_like_transformers() -> None:
    template = "{% for m in messages %}\n  {{ m.content }}\n{% endfor %}"
    tok = tokenizer_from_gguf_metadata(tokenizer_metadata(**{"tokenizer.chat_template": template}))
    assert tok.apply_chat_template([{"role": "user", "content": "a"}]) == "  a\n"


def test_chat_template_errors_are_named() -> None:
    raising = "{{ raise_exception('only user turns') }}"
    tok = tokenizer_from_gguf_metadata(tokenizer_metadata(**{"tokenizer.chat_template": raising}))
    with pytest.raises(ChatTemplateError, match="only user turns"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    none = tokenizer_from_gguf_metadata(tokenizer_metadata(**{"tokenizer.chat_template": ""}))
    with pytest.raises(ChatTemplateError, match="no chat template"):
        none.apply_chat_template([{"role": "user", "content": "x"}])


def test_chat_template_is_sandboxed() -> None:
    escape = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    tok = tokenizer_from_gguf_metadata(tokenizer_metadata(**{"tokenizer.chat_template": escape}))
    with pytest.raises(ChatTemplateError):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("messages", [[], "hi", [{"content": "no role"}], [["user", "x"]]])
def test_malformed_messages_are_refused(tok: FastTokenizer, messages: object) -> None:
    with pytest.raises(ChatTemplateError, match="messages"):
        tok.apply_chat_template(messages)  # type: ignore[arg-type]


# --- incremental detokenizer ---------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS[1:4])
def test_incremental_detokenizer_never_splits_a_character(tok: FastTokenizer, text: str) -> None:
    prompt = tok.encode("hello")
    # the vocabulary merges no multi-byte character: each arrives over several byte tokens
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, prompt)
    deltas = [detok.push(i) for i in ids]
    assert "".join(deltas) + detok.flush() == text
    assert all("\ufffd" not in d for d in deltas)


def test_incremental_detokenizer_emits_a_character_on_its_last_byte(tok: FastTokenizer) -> None:
    emoji = tok.encode("🤗")
    assert len(emoji) == 4
    detok = IncrementalDetokenizer(tok, tok.encode("hello"))
    assert [detok.push(i) for i in emoji] == ["", "", "", "🤗"]
    assert detok.push(ID["Ġworld"]) == " world"


def test_incremental_detokenizer_flushes_an_incomplete_tail(tok: FastTokenizer) -> None:
    detok = IncrementalDetokenizer(tok, [])
    first_two_bytes = tok.encode("🤗")[:2]
    assert [detok.push(i) for i in first_two_bytes] == ["", ""]
    assert detok.flush() == "\ufffd"


def test_incremental_detokenizer_skips_special_tokens(tok: FastTokenizer) -> None:
    detok = IncrementalDetokenizer(tok, tok.encode("hello"))
    out = [detok.push(i) for i in tok.encode(" world<|im_end|>")]
    assert "".join(out) == " world"


# --- tokenizer.json ------------------------------------------------------------------------------


def test_load_tokenizer_json_directory(tok: FastTokenizer, tmp_path) -> None:
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"},
        "chat_template": CHAT_TEMPLATE}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    loaded = load_tokenizer_json(tmp_path)
    assert loaded.bos_token_id == 1 and loaded.eos_token_ids == (2, 0)
    for text in TEXTS:
        assert loaded.encode(text) == tok.encode(text)
    messages = [{"role": "user", "content": "hi"}]
    assert loaded.apply_chat_template(messages) == tok.apply_chat_template(messages)
    assert load_tokenizer_json(tmp_path / "tokenizer.json").encode("12") == tok.encode("12")


def test_load_tokenizer_json_prefers_chat_template_jinja(tok: FastTokenizer, tmp_path) -> None:
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "old"}))
    (tmp_path / "chat_template.jinja").write_text("new{{ messages[0].content }}")
    assert load_tokenizer_json(tmp_path).apply_chat_template(
        [{"role": "user", "content": "!"}]) == "new!"


def test_load_tokenizer_json_errors(tmp_path) -> None:
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer_json(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        load_tokenizer_json(tmp_path)
