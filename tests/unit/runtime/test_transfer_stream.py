"""Where the transfer kernels run (kernels/kvcopy.transfer_stream; P's gathers, D's uploads and
scatters): a stream of their own on CUDA, the caller's stream on CPU or with
PD_RUNTIME_TRANSFER_STREAM=engine; a wrong value is refused by name. The CUDA behaviour itself
is checked in tests/gpu/test_transfer_stream_gpu.py."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from pd_runtime.kernels.kvcopy import on_stream, queued_work, transfer_stream  # noqa: E402


@pytest.mark.parametrize("value", [None, "priority", "engine"])
def test_cpu_gathers_on_the_callers_stream(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("PD_RUNTIME_TRANSFER_STREAM", raising=False)
    else:
        monkeypatch.setenv("PD_RUNTIME_TRANSFER_STREAM", value)
    assert transfer_stream("cpu") is None
    assert queued_work("cpu") is None


def test_engine_keeps_cuda_gathers_on_the_callers_stream(monkeypatch):
    monkeypatch.setenv("PD_RUNTIME_TRANSFER_STREAM", "engine")
    assert transfer_stream("cuda:0") is None  # decided before any CUDA call: no device needed


def test_a_wrong_value_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("PD_RUNTIME_TRANSFER_STREAM", "high")
    with pytest.raises(ValueError, match="PD_RUNTIME_TRANSFER_STREAM='high'.*priority"):
        transfer_stream("cpu")


def test_without_a_stream_the_block_runs_as_it_is():
    ran = []
    with on_stream(None, None):
        ran.append(1)
    assert ran == [1]


def test_stage_at_hold_switch_names_a_wrong_value(monkeypatch):
    from pd_runtime.worker import stage_at_hold_default

    monkeypatch.delenv("PD_RUNTIME_STAGE_AT_HOLD", raising=False)
    assert stage_at_hold_default("cuda:0") is True and stage_at_hold_default("cpu") is False
    monkeypatch.setenv("PD_RUNTIME_STAGE_AT_HOLD", "0")
    assert stage_at_hold_default("cuda") is False
    monkeypatch.setenv("PD_RUNTIME_STAGE_AT_HOLD", "1")
    assert stage_at_hold_default("cpu") is True
    monkeypatch.setenv("PD_RUNTIME_STAGE_AT_HOLD", "yes")
    with pytest.raises(ValueError, match="STAGE_AT_HOLD=.yes.: expected one of 0, 1, auto"):
        stage_at_hold_default("cuda")
