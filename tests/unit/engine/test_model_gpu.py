"""The same engine on CUDA: every family's greedy tokens on the GPU equal the CPU's (float32),
and bfloat16 / fp8 KV run with chunked prefill equal to one-shot. Skipped without CUDA."""

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
    assert generate(ck, PROMPT, 10, block_size=4, prefill_chunk=4, **kw) == one  # type: ignore[arg-type]
