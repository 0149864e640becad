"""GPU: the decode paths agree. kernels.paged_decode and mla_paged_decode against the same
attention in plain torch (bf16 / fp32, HND / NHD, GQA ratios, sliding windows, MLA head counts,
split plans); every family's greedy tokens
under PD_RUNTIME_DECODE=legacy, paged and graph (CUDA graphs) equal in float32, and in bfloat16
the three give close logits along legacy's tokens (teacher-forced: different kernels round
differently, so free-running bf16 greedy may part at a near tie); a continuous-batching engine
(mixed prefill + decode steps, graph batch padding) equals offline legacy generation; graph
replays (padded batch) equal eager paged steps and leave the cache as they do. Skips without
CUDA."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.gpu_marks import gpu_marks, torch

pytestmark = gpu_marks(timeout_s=300)

PROMPT = [1, 17, 42, 99, 3, 250, 8, 64, 5, 130, 77, 12, 9]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("geo", [(16, 128, 32, 8, 0), (3, 24, 8, 2, 5), (16, 64, 4, 4, 40)])
def test_kernel_equals_reference(dtype: str, layout: str, geo: tuple) -> None:
    from pd_runtime.kernels.paged_decode import paged_decode, paged_decode_reference, split_plan

    bs, d, hq, hkv, window = geo
    dt = getattr(torch, dtype)
    g = torch.Generator(device="cuda").manual_seed(hash((dtype, layout, geo)) % 1000)
    nb, b = 400, 5
    if layout == "HND":
        kv = torch.randn(nb, hkv, bs, 2 * d, device="cuda", generator=g).to(dt).permute(0, 2, 1, 3)
    else:
        kv = torch.randn(nb, bs, hkv, 2 * d, device="cuda", generator=g).to(dt)
    lens = torch.tensor([1, 2, 17, 300, 1000][:b], dtype=torch.int32, device="cuda")
    width = (1000 + bs - 1) // bs
    table = torch.randint(0, nb, (b, width), device="cuda", generator=g, dtype=torch.int32)
    q = torch.randn(b, hq, d, device="cuda", generator=g).to(dt)
    ref = paged_decode_reference(q, kv[..., :d], kv[..., d:], table, lens, scale=d**-0.5,
                                 window=window).float()
    tol = 1e-5 if dtype == "float32" else 2e-2
    for splits, tps in {split_plan(b, hkv, 1000), (1, 1024), (16, 64)}:
        out = paged_decode(q, kv[..., :d], kv[..., d:], table, lens, scale=d**-0.5,
                           window=window, num_splits=splits, tokens_per_split=tps).float()
        assert torch.isfinite(out).all()
        rel = float((out - ref).norm() / ref.norm())
        assert rel < tol, (splits, tps, rel)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("geo", [(16, 512, 64, 16), (16, 512, 64, 40), (3, 32, 8, 4)])
def test_mla_kernel_equals_reference(dtype: str, geo: tuple) -> None:
    from pd_runtime.kernels.paged_decode import (
        mla_paged_decode,
        mla_paged_decode_reference,
        split_plan,
    )

    bs, r, rd, h = geo
    dt = getattr(torch, dtype)
    g = torch.Generator(device="cuda").manual_seed(hash((dtype, geo)) % 1000)
    nb, b = 300, 4
    lat = torch.randn(nb, bs, 1, r + rd, device="cuda", generator=g).to(dt)[:, :, 0]
    lens = torch.tensor([1, 40, 333, 900], dtype=torch.int32, device="cuda")
    table = torch.randint(0, nb, (b, (900 + bs - 1) // bs), device="cuda", generator=g,
                          dtype=torch.int32)
    ql = torch.randn(b, h, r, device="cuda", generator=g).to(dt)
    qp = torch.randn(b, h, rd, device="cuda", generator=g).to(dt)
    scale = (128 + rd) ** -0.5
    ref = mla_paged_decode_reference(ql, qp, lat, table, lens, scale=scale).float()
    tol = 1e-5 if dtype == "float32" else 2e-2
    for splits, tps in {split_plan(b, -(-h // 16), 900), (1, 1024), (15, 64)}:
        out = mla_paged_decode(ql, qp, lat, table, lens, scale=scale, num_splits=splits,
                               tokens_per_split=tps).float()
        assert torch.isfinite(out).all()
        rel = float((out - ref).norm() / ref.norm())
        assert rel < tol, (splits, tps, rel)


def _generate(monkeypatch, mode: str, ck, **kw) -> list[int]:
    from pd_runtime.engine.generate import generate

    monkeypatch.setenv("PD_RUNTIME_DECODE", mode)
    return generate(ck, PROMPT, 12, device="cuda", **kw)


@pytest.mark.parametrize(
    "fam",
    ["dense", "dense-qk-norm", "dense-llama3-rope", "sliding", "moe", "hybrid", "mla", "mla-qlora"],
)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_families_decode_paths_equal(tmp_path: Path, monkeypatch, fam: str, dtype: str) -> None:
    pytest.importorskip("transformers")
    from pd_runtime.engine.checkpoint import load_checkpoint
    from tests.engine_fixtures import FAMILY_CONFIGS, write_family

    if fam not in FAMILY_CONFIGS:
        pytest.skip(f"no fixture family {fam}")
    ck = load_checkpoint(write_family(tmp_path / fam, fam), dtype=dtype)
    want = _generate(monkeypatch, "legacy", ck, block_size=4)
    if dtype == "bfloat16":
        ref = _forced_logits(monkeypatch, "legacy", ck, want, "HND")
        for mode, layout in (("paged", "HND"), ("graph", "NHD")):
            got = _forced_logits(monkeypatch, mode, ck, want, layout)
            rel = ((got - ref).norm(dim=-1) / ref.norm(dim=-1)).max()
            assert float(rel) < 2e-2, (mode, float(rel))
        return
    for mode in ("paged", "graph"):
        assert _generate(monkeypatch, mode, ck, block_size=4) == want, mode
        got = _generate(monkeypatch, mode, ck, block_size=3, layout="NHD", prefill_chunk=5)
        assert got == want, (mode, "NHD, chunked")


def _forced_logits(monkeypatch, mode: str, ck, tokens: list[int], layout: str):
    """Logits of each decode step fed `tokens` (not its own argmax), block size 4."""
    from pd_runtime import kvcache
    from pd_runtime.engine.core import rank_spec_for
    from pd_runtime.engine.kv import KVCache, chunk_block_table
    from pd_runtime.engine.runner import ModelRunner, SeqChunk

    monkeypatch.setenv("PD_RUNTIME_DECODE", mode)
    spec = rank_spec_for(ck.config, block_size=4, layout=layout, num_blocks=64)
    runner = ModelRunner(ck, KVCache.allocate(spec, "cuda"), "cuda")
    groups = [g for g in kvcache.groups_of(spec.model) if g != kvcache.GROUP_STATE]
    ids = list(range(64))

    def step(toks: list[int], start: int):
        tabs = {g: chunk_block_table(spec.model, g, start, start + len(toks), 4, ids)
                for g in groups}
        return runner.execute([SeqChunk(toks, start, tabs, state_slot=0)])[0]

    out = [step(PROMPT, 0)]
    for i, t in enumerate(tokens[:-1]):
        out.append(step([t], len(PROMPT) + i))
    return torch.stack(out).float()


def test_engine_batches_graph_equal_legacy_offline(tmp_path: Path, monkeypatch) -> None:
    """Continuous batching with the new path (mixed prefill + decode steps split between SDPA
    and the paged kernel, all-decode steps from graphs at padded batch sizes 1..8) equals
    single-sequence legacy generation; graph captures happened."""
    from pd_runtime.engine.checkpoint import load_checkpoint
    from pd_runtime.engine.core import engine_from_checkpoint, rank_spec_for
    from pd_runtime.engine.generate import generate
    from pd_runtime.engine.sampling import SamplingParams
    from tests.engine_fixtures import write_tiny_llama

    ck = load_checkpoint(write_tiny_llama(tmp_path, seed=5, kv_heads=4))
    r = random.Random(13)
    ps = [[r.randrange(2, 256) for _ in range(r.randrange(2, 90))] for _ in range(7)]
    monkeypatch.setenv("PD_RUNTIME_DECODE", "legacy")
    want = [generate(ck, pr, 10, ignore_eos=True, device="cuda") for pr in ps]
    monkeypatch.setenv("PD_RUNTIME_DECODE", "graph")
    spec = rank_spec_for(ck.config, block_size=16, layout="HND", num_blocks=96)
    eng = engine_from_checkpoint(ck, spec, device="cuda", seed=0, max_num_batched_tokens=48)
    got = eng.generate(ps, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    assert got == want
    assert eng.runner.graphs is not None and eng.runner.graphs.captures >= 2
    assert eng.blocks.usage() == 0.0


def test_graph_replay_equals_eager_paged(tmp_path: Path, monkeypatch) -> None:
    """Three sequences (graph batch 4: one padded row) for 20 steps, float32: graph replays give
    the eager paged logits (to rounding: the split plans differ) and the padded row leaves the
    cache as eager steps leave it."""
    from pd_runtime import kvcache
    from pd_runtime.engine.checkpoint import load_checkpoint
    from pd_runtime.engine.core import rank_spec_for
    from pd_runtime.engine.kv import KVCache
    from pd_runtime.engine.runner import ModelRunner, SeqChunk
    from tests.engine_fixtures import write_tiny_llama

    monkeypatch.setenv("PD_RUNTIME_DECODE", "graph")
    ck = load_checkpoint(write_tiny_llama(tmp_path, seed=3, kv_heads=2))
    spec = rank_spec_for(ck.config, block_size=4, num_blocks=120)
    runs = []
    for mode in ("paged", "graph"):
        runner = ModelRunner(ck, KVCache.allocate(spec, "cuda"), "cuda")
        runner.decode_mode = mode
        tabs = [{kvcache.GROUP_FULL: list(range(40 * i, 40 * i + 40))} for i in range(3)]
        lens = [5, 30, 61]
        for i, n in enumerate(lens):
            runner.execute([SeqChunk(list(range(2, 2 + n)), 0, tabs[i])])
        out = []
        for k in range(20):
            batch = [SeqChunk([3 + i], lens[i] + k, tabs[i]) for i in range(3)]
            out.append(runner.execute(batch))
        runs.append((torch.stack(out), runner.kv.arena.clone()))
        if mode == "graph":
            assert runner.graphs is not None and runner.graphs.captures >= 2
    assert torch.equal(runs[0][0].argmax(-1), runs[1][0].argmax(-1))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-4, atol=1e-4)
    a, b = (r[1].view(torch.float32) for r in runs)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
