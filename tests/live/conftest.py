"""The live tier: real vLLM 0.32.0 (CPU build), NIXL and vllm-router 0.1.17 from PyPI, in the
cached live environment (pd_operator.live_vllm; `make test` installs it first)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.live.checkpoint import write_live_checkpoint


@pytest.fixture(scope="session")
def live_python() -> Path:
    """The live environment's interpreter: installed here when it is missing (about 4 minutes,
    once per machine); the tier skips, with the reason, when it can be neither found nor
    installed. PD_LIVE_VLLM_INSTALL=0 forbids the install (skip instead)."""
    from pd_operator import live_vllm

    found = live_vllm.python()
    if found:
        return found
    if os.environ.get("PD_LIVE_VLLM_INSTALL") == "0":
        pytest.skip(f"the live vLLM environment is not installed in {live_vllm.root()} and "
                    "PD_LIVE_VLLM_INSTALL=0 (install: deploy/live-vllm.sh)")
    try:
        return live_vllm.ensure(print)
    except live_vllm.LiveEnvError as exc:
        pytest.skip(f"the live vLLM environment cannot be installed: {exc}")


@pytest.fixture(scope="session")
def live_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny random Llama (+ byte tokenizer) the live specs name as their model."""
    return write_live_checkpoint(tmp_path_factory.mktemp("live-ckpt") / "tiny-llama")
