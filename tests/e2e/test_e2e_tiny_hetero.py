"""The hetero cell through vllm-router: P TP 1 / block 16 -> D TP 2 / block 32."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.runner import DEPLOYMENTS, MAX_TOKENS, PROMPTS, pdctl_run, post
from tests.e2e.runner import TINY_MODEL as MODEL

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def test_hetero_tp_and_block_size_through_the_router(tiny_ckpt, expected, tmp_path: Path):
    """P TP 1 / block 16 -> D TP 2 / block 32: every D rank pulls its half of the KV heads."""
    with pdctl_run(DEPLOYMENTS / "tiny-hetero.yaml", {MODEL: tiny_ckpt}, tmp_path) as running:
        for prompt, want in zip(PROMPTS, expected, strict=True):
            status, out = post(running.url + "/v1/completions",
                               {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS,
                                "temperature": 0, "ignore_eos": True,
                                "return_token_ids": True})
            assert status == 200, (out, running.logs())
            assert out["choices"][0]["token_ids"] == want
        assert running.metrics("decode-0")["pd_runtime_kv_pulls_total"] == len(PROMPTS)


