"""Where P's gathers run (kernels/kvcopy.gather_stream): a stream of their own on CUDA, the
caller's stream on CPU or with PD_RUNTIME_GATHER_STREAM=engine; a wrong value is refused by name.
The CUDA behaviour itself is checked in tests/gpu/test_gather_stream_gpu.py."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from pd_runtime.kernels.kvcopy import gather_stream, on_stream, queued_work  # noqa: E402


@pytest.mark.parametrize("value", [None, "priority", "engine"])
def test_cpu_gathers_on_the_callers_stream(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("PD_RUNTIME_GATHER_STREAM", raising=False)
    else:
        monkeypatch.setenv("PD_RUNTIME_GATHER_STREAM", value)
    assert gather_stream("cpu") is None
    assert queued_work("cpu") is None


def test_engine_keeps_cuda_gathers_on_the_callers_stream(monkeypatch):
    monkeypatch.setenv("PD_RUNTIME_GATHER_STREAM", "engine")
    assert gather_stream("cuda:0") is None  # decided before any CUDA call: no device needed


def test_a_wrong_value_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("PD_RUNTIME_GATHER_STREAM", "high")
    with pytest.raises(ValueError, match="PD_RUNTIME_GATHER_STREAM='high'.*priority"):
        gather_stream("cpu")


def test_without_a_stream_the_block_runs_as_it_is():
    ran = []
    with on_stream(None, None):
        ran.append(1)
    assert ran == [1]
