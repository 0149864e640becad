"""GPU: P at TP 1 -> D at TP 2 with both D ranks on ONE GPU (PD_RUNTIME_TP_BACKEND=gloo, the
opt-in of engine/dist.py: NCCL refuses two ranks on one device). Each D rank pulls its half of
the KV heads from P's single rank (the planner's head split, VRAM -> VRAM over NIXL) and D's
tokens equal offline generation on CUDA; gloo's all_reduce on CUDA bf16 tensors sums exactly.
Skips without CUDA."""

from __future__ import annotations

import asyncio

import pytest

from tests.gpu_marks import gpu_marks, torch

pytestmark = gpu_marks(timeout_s=300)


def _sum_worker(rank: int, init: str, out: str) -> None:
    import os

    os.environ["PD_RUNTIME_TP_BACKEND"] = "gloo"
    from pd_runtime.engine.dist import init_tp, shutdown_tp

    group = init_tp(rank, 2, init, "cuda", timeout_s=60)
    try:
        assert torch.distributed.get_backend(group) == "gloo"
        x = (torch.arange(4096) % 7 + rank).to(torch.bfloat16).reshape(1, 4096).cuda()
        torch.distributed.all_reduce(x, group=group)
        torch.save(x.cpu(), f"{out}/rank{rank}.pt")
    finally:
        shutdown_tp()


def test_gloo_all_reduce_two_ranks_one_gpu(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_sum_worker, args=(f"file://{tmp_path}/init", str(tmp_path)), nprocs=2,
             join=True)
    want = (torch.arange(4096) % 7 * 2 + 1).to(torch.bfloat16).reshape(1, 4096)
    for r in range(2):
        assert torch.equal(torch.load(tmp_path / f"rank{r}.pt"), want)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests.engine_fixtures import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny"), seed=21, kv_heads=4)


def test_p_tp1_to_d_tp2_on_one_gpu_equals_offline(model_dir, monkeypatch):
    """P (TP 1) here, D (TP 2: rank 0 in a process of its own, rank 1 its tp_worker) on the same
    card; three processes, three CUDA contexts."""
    from pd_runtime.engine.checkpoint import load_checkpoint
    from pd_runtime.engine.generate import generate
    from pd_runtime.transport import default_env
    from tests.helpers import nixl_import_error
    from tests.runtime.test_engine_pd_tp import PROMPTS, TOKEN, prefill_then_decode_elsewhere

    err = nixl_import_error()
    if err is not None:
        pytest.skip(f"nixl cannot be imported here: {err}")
    default_env("cuda")
    monkeypatch.setenv("PD_RUNTIME_TP_BACKEND", "gloo")  # inherited by both D ranks
    d_args = dict(role="decode", tensor_parallel_size=2, block_size=32, kv_cache_layout="NHD",
                  model=model_dir, served_model_name="tiny", token=TOKEN, num_blocks=48, seed=0,
                  device="cuda")
    tokens, d_stats, p_stats = asyncio.run(asyncio.wait_for(
        prefill_then_decode_elsewhere(model_dir, d_args, p_tp=1, device="cuda"), 280))
    ckpt = load_checkpoint(model_dir)
    for i, pr in enumerate(PROMPTS):
        assert tokens[i] == generate(ckpt, pr, 7, ignore_eos=True, device="cuda"), f"prompt {i}"
    assert d_stats["kv_pulls"] == len(PROMPTS) and d_stats["kv_pull_failures"] == 0
    assert d_stats["free_blocks"] == 48
    assert p_stats["kv_held"] == 0 and p_stats["free_blocks"] == 96  # both D ranks read
