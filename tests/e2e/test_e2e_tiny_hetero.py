"""Hetero cells through vllm-router: P TP 1 -> D TP 2 and P TP 2 -> D TP 1, block 16 -> 32."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.runner import DEPLOYMENTS, MAX_TOKENS, PROMPTS, pdctl_run, post
from tests.e2e.runner import TINY_MODEL as MODEL

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


@pytest.mark.parametrize("deployment", ["tiny-hetero.yaml", "tiny-hetero-reverse.yaml"])
def test_hetero_tp_and_block_size_through_the_router(deployment, tiny_ckpt, expected,
                                                     tmp_path: Path):
    """P TP 1 -> D TP 2: every D rank pulls its half of the KV heads from the one P rank;
    P TP 2 -> D TP 1: the D rank pulls from both P ranks. Blocks 16 on P, 32 on D."""
    with pdctl_run(DEPLOYMENTS / deployment, {MODEL: tiny_ckpt}, tmp_path) as running:
        for prompt, want in zip(PROMPTS, expected, strict=True):
            status, out = post(running.url + "/v1/completions",
                               {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS,
                                "temperature": 0, "ignore_eos": True,
                                "return_token_ids": True})
            assert status == 200, (out, running.logs())
            assert out["choices"][0]["token_ids"] == want
        assert running.metrics("decode-0")["pd_runtime_kv_pulls_total"] == len(PROMPTS)


