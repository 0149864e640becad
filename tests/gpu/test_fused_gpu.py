"""GPU: kernels.fused against the torch ops it replaces (bf16 / float32, strided views, partial
and interleaved rope, HND / NHD caches), and the engine with the glue fused against unfused
(PD_RUNTIME_FUSED's two paths, the same weights): float32 greedy tokens equal, bfloat16 logits
along the unfused tokens within rounding, one-shot and chunked prefill, decode through the
CUDA-graph path; and an 8B-shaped layer's prefill (one sequence, no gathers) against unfused.
Skips without CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.gpu_marks import gpu_marks, torch

pytestmark = gpu_marks(timeout_s=300)


def test_kernels_equal_torch_ops() -> None:
    from tests.fused_checks import check_kernels

    check_kernels("cuda")


@pytest.mark.parametrize(
    "fam", ["dense", "dense-qk-norm", "dense-llama3-rope", "sliding", "mla", "mla-qlora",
            "hybrid", "moe-shared"])
def test_model_fused_equals_unfused(tmp_path: Path, fam: str) -> None:
    pytest.importorskip("transformers")
    from tests.fused_checks import check_model

    check_model(tmp_path, [fam], "cuda")


def test_graph_decode_fused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode steps replayed from CUDA graphs with the glue fused give the tokens of the eager
    unfused legacy path (float32)."""
    pytest.importorskip("transformers")
    from pd_runtime.engine.checkpoint import load_checkpoint
    from pd_runtime.engine.generate import generate
    from tests.engine_fixtures import write_family

    ck = load_checkpoint(write_family(tmp_path / "dense", "dense"))
    prompt = [1, 17, 42, 99, 3, 250, 8, 64, 5, 130, 77, 12, 9]
    monkeypatch.setenv("PD_RUNTIME_FUSED", "0")
    monkeypatch.setenv("PD_RUNTIME_DECODE", "legacy")
    ref = generate(ck, prompt, 16, block_size=4, device="cuda", ignore_eos=True)
    monkeypatch.setenv("PD_RUNTIME_FUSED", "1")
    monkeypatch.setenv("PD_RUNTIME_DECODE", "graph")
    assert generate(ck, prompt, 16, block_size=4, device="cuda", ignore_eos=True) == ref


def test_8b_layer_prefill_fused_equals_unfused() -> None:
    """One Llama-3-8B-shaped layer (random bf16 weights), a 2k-token prompt: the fused path
    (no padded gathers, K/V written from the projection) gives the unfused logits within bf16
    rounding and writes the same cache rows."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "e2e"))
    from random_model import hf_config, random_weights

    from pd_runtime import kvcache
    from pd_runtime.engine.checkpoint import Checkpoint
    from pd_runtime.engine.config import ModelConfig
    from pd_runtime.engine.core import rank_spec_for
    from pd_runtime.engine.kv import KVCache
    from pd_runtime.engine.runner import ModelRunner, SeqChunk

    cfg = dict(hf_config("llama3-8b"), num_hidden_layers=1, vocab_size=4096)
    ck = Checkpoint(ModelConfig.from_hf(cfg), random_weights(cfg, "cuda", 0), None, "8b-layer")
    n, bs = 2048, 16
    outs, caches = [], []
    for fused in (False, True):
        spec = rank_spec_for(ck.config, block_size=bs, num_blocks=n // bs + 1)
        kv = KVCache.allocate(spec, "cuda")
        runner = ModelRunner(ck, kv, "cuda")
        runner.model.fused = fused
        ids = torch.randint(2, 4096, (n,), generator=torch.Generator().manual_seed(0)).tolist()
        chunk = SeqChunk(ids, 0, {kvcache.GROUP_FULL: list(range(n // bs))})
        outs.append(runner.execute([chunk])[0])
        caches.append(kv.layers[0].data.float())
    a, b = outs
    assert float((a - b).norm() / a.norm()) < 2e-2
    ka, kb = caches  # every K / V row written, to bf16 rounding
    assert float(ka.abs().sum()) > 0
    assert float((ka - kb).norm() / ka.norm()) < 1e-2
