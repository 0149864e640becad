"""The real ModelRunner under the scheduler: continuous-batched greedy output equals the offline
single-sequence `generate`, token for token, with chunked prefill, joins and preemption."""

from __future__ import annotations

import random

import pytest

from pd_runtime.engine.checkpoint import load_checkpoint
from pd_runtime.engine.core import engine_from_checkpoint, rank_spec_for
from pd_runtime.engine.generate import generate
from pd_runtime.engine.sampling import SamplingParams
from tests.engine_fixtures import write_tiny_llama

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return load_checkpoint(write_tiny_llama(tmp_path_factory.mktemp("tiny"), seed=3, kv_heads=4))


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    r = random.Random(seed)
    return [[r.randrange(2, 256) for _ in range(r.randrange(3, 45))] for _ in range(n)]


@pytest.mark.parametrize("layout,block", [("NHD", 4)])  # HND and other blocks: the P/D tests
def test_batched_greedy_equals_offline_generate(ckpt, layout, block):
    spec = rank_spec_for(ckpt.config, block_size=block, layout=layout, num_blocks=200 // block * 4)
    eng = engine_from_checkpoint(ckpt, spec, max_num_batched_tokens=24, seed=0)
    ps = prompts(5)
    lens = [6, 9, 4, 12, 7]
    got: dict[str, list[int]] = {}
    eng.add_request("r0", ps[0], SamplingParams(max_tokens=lens[0], temperature=0))
    eng.add_request("r1", ps[1], SamplingParams(max_tokens=lens[1], temperature=0))
    step = 0
    while eng.has_unfinished() or step < 3:
        if step == 2:  # late arrivals join the running batch
            for i in (2, 3, 4):
                eng.add_request(f"r{i}", ps[i], SamplingParams(max_tokens=lens[i], temperature=0))
        for o in eng.step():
            assert o.error is None
            got.setdefault(o.request_id, []).extend(o.token_ids)
        step += 1
    for i, p in enumerate(ps):
        want = generate(ckpt, p, lens[i], block_size=block, layout=layout, ignore_eos=True)
        assert got[f"r{i}"] == want, f"request {i}"
    assert eng.blocks.usage() == 0.0


def test_preemption_under_memory_pressure_stays_exact(ckpt):
    spec = rank_spec_for(ckpt.config, block_size=4, num_blocks=24)
    eng = engine_from_checkpoint(ckpt, spec, max_num_batched_tokens=64, seed=0)
    ps = [p[:20] + [5] * max(0, 20 - len(p)) for p in prompts(4, seed=5)]
    outs = eng.generate(ps, SamplingParams(max_tokens=12, temperature=0))
    assert eng.stats.preemptions > 0
    for p, o in zip(ps, outs, strict=True):
        assert o == generate(ckpt, p, 12, block_size=4, ignore_eos=True)
