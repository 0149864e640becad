"""The TP group's backend: NCCL on CUDA and gloo on CPU by default; PD_RUNTIME_TP_BACKEND=gloo
opts a CUDA group into gloo (several ranks on one GPU); unknown names and NCCL off CUDA fail."""

from __future__ import annotations

import pytest

from pd_runtime.engine.dist import TP_BACKEND_ENV, backend_for


def test_default_backends(monkeypatch):
    monkeypatch.delenv(TP_BACKEND_ENV, raising=False)
    assert backend_for("cuda") == "nccl"
    assert backend_for("cuda:1") == "nccl"
    assert backend_for("cpu") == "gloo"
    monkeypatch.setenv(TP_BACKEND_ENV, "")
    assert backend_for("cuda") == "nccl"


def test_gloo_opt_in_on_cuda(monkeypatch):
    monkeypatch.setenv(TP_BACKEND_ENV, "gloo")
    assert backend_for("cuda") == "gloo"
    assert backend_for("cpu") == "gloo"
    monkeypatch.setenv(TP_BACKEND_ENV, " GLOO ")
    assert backend_for("cuda:0") == "gloo"
    monkeypatch.setenv(TP_BACKEND_ENV, "nccl")
    assert backend_for("cuda") == "nccl"


@pytest.mark.parametrize("value,device", [("mpi", "cuda"), ("nccl", "cpu"), ("ucc", "cpu")])
def test_bad_backend_named(monkeypatch, value, device):
    monkeypatch.setenv(TP_BACKEND_ENV, value)
    with pytest.raises(ValueError, match=TP_BACKEND_ENV):
        backend_for(device)
