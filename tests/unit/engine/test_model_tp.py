"""Tensor parallelism: TP 2 / 3 / 4 ranks (spawned processes, gloo) give the logits of TP 1
within float tolerance and identical greedy tokens, for every family; KV heads per rank follow
kvcache.heads_of_rank (split, and replicated when TP > KV heads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pd_runtime.engine.checkpoint import load_checkpoint
from pd_runtime.engine.generate import generate
from pd_runtime.engine.model import Model, WeightError
from tests.engine_fixtures import FAMILY_CONFIGS, run_tp, write_family, write_tiny_llama

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

PROMPT = [1, 17, 42, 99, 3, 250, 8, 64, 5, 130, 77, 12, 9]
N = 10


def tp1_reference(path: str, job: dict) -> tuple[list[int], torch.Tensor]:
    from pd_runtime import kvcache
    from pd_runtime.engine.generate import greedy
    from pd_runtime.engine.kv import KVCache
    from pd_runtime.engine.runner import ModelRunner

    ck = load_checkpoint(path)
    spec = kvcache.RankSpec(
        ck.config.model_spec(job.get("cache_dtype", "auto")),
        block_size=4,
        layout=job.get("layout", "HND"),
        num_blocks=64,
    )
    tokens, logits = greedy(
        ModelRunner(ck, KVCache.allocate(spec), "cpu"),
        job["prompt"],
        job["n"],
        prefill_chunk=job.get("prefill_chunk", 0),
    )
    return tokens, torch.stack(logits)


def decided_steps(logits: torch.Tensor, margin: float) -> int:
    """Steps whose greedy choice float noise cannot flip (top-2 gap above `margin`); after a
    near-tie, TP 1 and TP k may legitimately pick different tokens and then differ."""
    top2 = logits.topk(2, -1).values
    close = ((top2[:, 0] - top2[:, 1]) <= margin).nonzero()
    return int(close[0]) + 1 if len(close) else logits.shape[0]


def check(results: list, jobs: list[dict]) -> None:
    for j, job in enumerate(jobs):
        ref_tokens, ref_logits = tp1_reference(job["path"], job)
        tol = job.get("tol", 1e-4)
        n = decided_steps(ref_logits, job.get("margin", 1e-3))
        assert n >= len(ref_tokens) // 2, (
            f"{job['path']}: a near-tie at step {n}; pick another seed"
        )
        for rank_results in results:
            got = rank_results[j]
            assert got["tokens"][:n] == ref_tokens[:n], job["path"]
            torch.testing.assert_close(got["logits"][:n], ref_logits[:n], rtol=tol, atol=tol,
                                       msg=lambda m, job=job: f"job {job}: {m}")


def test_tp2_equals_tp1_for_every_family(tmp_path: Path) -> None:
    jobs = []
    for fam in FAMILY_CONFIGS:
        path = write_family(tmp_path / fam, fam)
        jobs.append(
            {
                "path": path,
                "prompt": PROMPT,
                "n": N,
                "layout": "NHD" if fam == "moe" else "HND",
                "prefill_chunk": 5 if fam == "sliding" else 0,
            }
        )
    # fp8: each rank's projection is narrower, so the CPU's float32 matmul may round a K/V
    # element differently from TP 1's, and one flipped fp8 rounding moves the logits ~1e-2
    # (0.011 on an AVX2-only CPU); the tokens stay TP 1's
    jobs.append({"path": jobs[0]["path"], "prompt": PROMPT, "n": N, "cache_dtype": "fp8",
                 "tol": 0.05})
    # bfloat16: row-parallel partials are summed in float32, so the tokens stay TP 1's
    bf16 = write_tiny_llama(tmp_path / "bf16", seed=3, dtype="bfloat16")
    jobs.append({"path": bf16, "prompt": [1, 2, 3], "n": 12, "tol": 0.1, "margin": 0.0})
    jobs.append({"path": bf16, "prompt": PROMPT, "n": N, "tol": 0.1, "margin": 0.0})
    (tmp_path / "run").mkdir()
    check(run_tp(2, jobs, tmp_path / "run"), jobs)


def test_tp3_with_three_kv_heads_smollm_shape(tmp_path: Path) -> None:
    """SmolLM2's head shape: 9 query heads, 3 KV heads, TP 3 (one KV head per rank)."""
    path = write_tiny_llama(
        tmp_path / "m", hidden=72, heads=9, kv_heads=3, head_dim=8, intermediate=96
    )
    jobs = [{"path": path, "prompt": PROMPT, "n": N}]
    (tmp_path / "run").mkdir()
    check(run_tp(3, jobs, tmp_path / "run"), jobs)


def test_tp4_replicates_two_kv_heads(tmp_path: Path) -> None:
    """TP 4 > 2 KV heads: each KV head lives on two ranks (kvcache.heads_of_rank); and a hybrid
    model whose 2 SSM groups are replicated over 4 ranks."""
    path = write_tiny_llama(tmp_path / "m", heads=8, kv_heads=2)
    jobs = [
        {"path": path, "prompt": PROMPT, "n": N, "layout": "NHD"},
        # Mamba-2 with 2 groups over 4 ranks: B/C replicated, the gated norm reduced
        {"path": write_family(tmp_path / "h", "hybrid"), "prompt": PROMPT, "n": N},
    ]
    (tmp_path / "run").mkdir()
    check(run_tp(4, jobs, tmp_path / "run"), jobs)


def test_shards_hold_the_kv_heads_of_the_rank(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "m", heads=8, kv_heads=2)
    ck = load_checkpoint(path)
    assert [Model(ck.config, ck.weights, "cpu", r, 4).kv_heads for r in range(4)] == [
        [0],
        [0],
        [1],
        [1],
    ]
    assert Model(ck.config, ck.weights, "cpu", 1, 2).kv_heads == [1]
    with pytest.raises(WeightError, match="cannot be split"):
        Model(ck.config, ck.weights, "cpu", 0, 3)
    assert generate(ck, PROMPT, 3)  # the unsharded model still runs
