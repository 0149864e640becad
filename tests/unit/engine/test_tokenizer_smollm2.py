"""SmolLM2's tokenizer from its GGUF metadata equals transformers' GGUF tokenizer.

One known, deliberate difference: the file's pre-tokenizer is llama.cpp's "smollm" (digits
isolated first, as SmolLM2's own tokenizer.json: Digits + ByteLevel); transformers' GGUF loader
leaves the digit split out, which changes only whitespace runs right before a digit. Those
strings are compared with transformers' tokenizer given SmolLM2's real pre-tokenizer.
"""

from __future__ import annotations

import os

import pytest

from pd_runtime.engine.gguf import load_gguf_tokenizer
from pd_runtime.engine.tokenizer import FastTokenizer, IncrementalDetokenizer, load_tokenizer_json
from tests.engine_fixtures import smollm2_or_skip

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and trailing   ",
    "tabs\tand\nnewlines\n\n\nand\r\nCRLF",
    "héllo wörld – naïve café, Ærøskøbing, ß",
    "emoji 🤗🚀 👩‍👩‍👧 ❤️ done",
    "中文 日本語のテキスト 한국어 Ελληνικά русский عربى",
    "def f(x):\n    return x ** 2  # square\n\nclass A:\n\tpass\n",
    'json = {"key": [1, 2.5, -3e10], "ok": true}',
    "The year 2024 was 12.5% better; call 555-0100 at 3:45pm.",
    "don't I'll we're you've she'd THEY'RE",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after a control token",
    "",
    " ",
    "a" * 300,
    "    \n    \n",
]
# whitespace runs right before a digit: where transformers' GGUF pre-tokenizer differs
DIGIT_AFTER_SPACES = ["x  123 abc", "\n\n1. first\n\n2. second", "total:    42", "a\t\t7"]

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi 👋"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "and 3+3?"}],
]


@pytest.fixture(scope="module")
def path() -> str:
    return smollm2_or_skip()


@pytest.fixture(scope="module")
def ours(path: str) -> FastTokenizer:
    return load_gguf_tokenizer(path)


@pytest.fixture(scope="module")
def theirs(path: str):  # transformers' tokenizer
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                      gguf_file=os.path.basename(path))


@pytest.fixture(scope="module")
def theirs_smollm_pre(theirs):
    """transformers' GGUF tokenizer (its Rust backend) with SmolLM2's tokenizer.json
    pre-tokenizer: Digits(individual_digits) then ByteLevel."""
    from tokenizers import Tokenizer, pre_tokenizers

    backend = Tokenizer.from_str(theirs.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return backend


def test_special_ids(ours: FastTokenizer, theirs) -> None:
    assert ours.bos_token_id == theirs.bos_token_id == 1
    assert ours.eos_token_ids == (theirs.eos_token_id,) == (2,)
    assert ours.pad_token_id == theirs.pad_token_id
    assert ours.vocab_size == len(theirs) == 49152


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_equal_transformers(ours: FastTokenizer, theirs, text: str) -> None:
    ids = ours.encode(text)
    assert ids == theirs.encode(text)
    assert ours.encode(text, add_special_tokens=False) == theirs.encode(
        text, add_special_tokens=False)
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
            ids, skip_special_tokens=skip)


@pytest.mark.parametrize("text", TEXTS + DIGIT_AFTER_SPACES)
def test_encode_equals_smollm2_pre_tokenizer(ours: FastTokenizer, theirs_smollm_pre,
                                             text: str) -> None:
    assert ours.encode(text) == theirs_smollm_pre.encode(text).ids


def test_digit_after_spaces_is_the_known_difference(ours: FastTokenizer, theirs) -> None:
    text = "x  123"
    assert [ours.id_to_token(i) for i in ours.encode(text)] == ["x", "ĠĠ", "1", "2", "3"]
    assert theirs.convert_ids_to_tokens(theirs.encode(text)) == ["x", "Ġ", "Ġ", "1", "2", "3"]


@pytest.mark.parametrize("messages", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_equals_transformers(ours: FastTokenizer, theirs, messages: list,
                                           add_generation_prompt: bool) -> None:
    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == theirs.apply_chat_template(messages, tokenize=False,
                                              add_generation_prompt=add_generation_prompt)
    assert ours.encode(text) == theirs.encode(text)


@pytest.mark.parametrize("text", TEXTS[4:8])
def test_incremental_detokenizer_on_the_real_vocabulary(ours: FastTokenizer, text: str) -> None:
    prompt = ours.encode(ours.apply_chat_template(CHATS[0]))
    detok = IncrementalDetokenizer(ours, prompt)
    deltas = [detok.push(i) for i in ours.encode(text)]
    assert "".join(deltas) + detok.flush() == text
    assert all("\ufffd" not in d for d in deltas)


def test_tokenizer_json_as_transformers_saves_it(theirs, tmp_path) -> None:
    """load_tokenizer_json reads what transformers writes (tokenizer.json, tokenizer_config.json,
    the chat template file) and tokenizes and renders as transformers does from that folder."""
    transformers = pytest.importorskip("transformers")
    theirs.save_pretrained(tmp_path)
    saved = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = load_tokenizer_json(tmp_path)
    assert ours.bos_token_id == saved.bos_token_id
    assert ours.eos_token_ids[0] == saved.eos_token_id
    for text in TEXTS:
        assert ours.encode(text) == saved.encode(text)
        assert ours.decode(ours.encode(text)) == saved.decode(saved.encode(text),
                                                               skip_special_tokens=True)
    for messages in CHATS:
        assert ours.apply_chat_template(messages) == saved.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)
