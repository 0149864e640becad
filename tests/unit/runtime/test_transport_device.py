"""The transport treats "cuda:N" as CUDA (TP ranks name their device with its index): VRAM
registrations and the UCX defaults, not DRAM (with which no NIXL backend moves a peer's VRAM)."""

from __future__ import annotations

import os

from pd_runtime.transport import default_env, is_cuda


def test_is_cuda():
    assert is_cuda("cuda") and is_cuda("cuda:0") and is_cuda("cuda:3")
    assert not is_cuda("cpu") and not is_cuda("meta")


def test_default_env_for_indexed_cuda_device(monkeypatch):
    for k in ("UCX_CUDA_IPC_ENABLE_GET_ZCOPY", "UCX_TLS"):
        monkeypatch.delenv(k, raising=False)
    default_env("cpu")
    assert "UCX_TLS" not in os.environ
    default_env("cuda:1")
    assert os.environ["UCX_CUDA_IPC_ENABLE_GET_ZCOPY"] == "y"
    assert os.environ["UCX_TLS"].startswith("cuda_ipc")
