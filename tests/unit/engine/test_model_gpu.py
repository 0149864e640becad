"""The same engine on CUDA: every family's greedy tokens on the GPU equal the CPU's (float32),
and bfloat16 / fp8 KV run with chunked prefill give one-shot's logits (to bf16 rounding, along
one-shot's tokens). Skipped without CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pd_runtime.engine.checkpoint import load_checkpoint
from pd_runtime.engine.generate import generate
from tests.engine_fixtures import FAMILY_CONFIGS, write_family

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

PROMPT = [1, 17, 42, 99, 3, 250, 8, 64, 5, 130, 77, 12, 9]


@pytest.mark.parametrize("fam", list(FAMILY_CONFIGS))
def test_cuda_equals_cpu(tmp_path: Path, fam: str) -> None:
    pytest.importorskip("transformers")
    ck = load_checkpoint(write_family(tmp_path / fam, fam))
    cpu = generate(ck, PROMPT, 12, block_size=4)
    assert generate(ck, PROMPT, 12, block_size=4, device="cuda") == cpu
    assert (
        generate(ck, PROMPT, 12, block_size=3, layout="NHD", device="cuda", prefill_chunk=5) == cpu
    )


@pytest.mark.parametrize("fam", ["dense", "mla", "sliding", "hybrid"])
@pytest.mark.parametrize("cache_dtype", ["auto", "fp8"])
def test_cuda_bf16(tmp_path: Path, fam: str, cache_dtype: str) -> None:
    pytest.importorskip("transformers")
    if fam == "hybrid" and cache_dtype == "fp8":
        pytest.skip("hybrid attention layers with fp8 are covered by the dense case")
    ck = load_checkpoint(write_family(tmp_path / fam, fam), dtype="bfloat16")
    kw = dict(device="cuda", cache_dtype=cache_dtype)
    one = generate(ck, PROMPT, 10, block_size=16, **kw)  # type: ignore[arg-type]
    assert len(one) == 10
    # Chunked prefill rounds differently in bf16, so free-running greedy may part at a near
    # tie (the MLA fixture does at step 6 under the latent-space decode kernel): compare the
    # two along one-shot's tokens instead, step by step.
    a = _forced_logits(ck, one, 16, 0, cache_dtype)
    b = _forced_logits(ck, one, 4, 4, cache_dtype)
    assert int(b[0].argmax()) == one[0]  # the prefill's own token
    rel = ((a - b).norm(dim=-1) / a.norm(dim=-1)).max()
    assert float(rel) < 2e-2, float(rel)


def _forced_logits(ck, tokens: list[int], block_size: int, chunk: int, cache_dtype: str):
    """float32 logits of the prompt (in chunks of `chunk`, 0: one) and of each decode step fed
    `tokens` rather than its own argmax."""
    from pd_runtime import kvcache
    from pd_runtime.engine.core import rank_spec_for
    from pd_runtime.engine.kv import KVCache, chunk_block_table
    from pd_runtime.engine.runner import ModelRunner, SeqChunk

    spec = rank_spec_for(ck.config, block_size=block_size, cache_dtype=cache_dtype, num_blocks=64)
    runner = ModelRunner(ck, KVCache.allocate(spec, "cuda"), "cuda")
    groups = [g for g in kvcache.groups_of(spec.model) if g != kvcache.GROUP_STATE]
    ids = list(range(64))

    def step(toks: list[int], start: int) -> torch.Tensor:
        tabs = {g: chunk_block_table(spec.model, g, start, start + len(toks), block_size, ids)
                for g in groups}
        return runner.execute([SeqChunk(toks, start, tabs, state_slot=0)])[0]

    n = chunk or len(PROMPT)
    for s in range(0, len(PROMPT), n):
        first = step(PROMPT[s : s + n], s)
    out = [first]
    for i, t in enumerate(tokens[:-1]):
        out.append(step([t], len(PROMPT) + i))
    return torch.stack(out).float()
