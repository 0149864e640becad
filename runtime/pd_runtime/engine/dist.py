"""Tensor-parallel process groups for the model: gloo on CPU, NCCL on CUDA, bounded timeouts.

PD_RUNTIME_TP_BACKEND=gloo puts a CUDA group on gloo instead (an explicit opt-in, for experiments
with several TP ranks on ONE GPU, which NCCL refuses): the engine's only model collective is a
sum all_reduce, which gloo runs on CUDA tensors through pinned host copies (torch's
ProcessGroupGloo, its CUDA host path); the orders of tp_worker are CPU objects either way. Slow
(two copies and a TCP round per all_reduce, 2 per layer), so only for decode-side measurements
where each step carries a few tokens. Unset (or "nccl" on CUDA): the default.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch.distributed as dist

TP_BACKEND_ENV = "PD_RUNTIME_TP_BACKEND"
TP_BACKENDS = ("nccl", "gloo")


def backend_for(device: str) -> str:
    """The group's backend for `device`: PD_RUNTIME_TP_BACKEND when set, else NCCL on CUDA and
    gloo elsewhere. ValueError for an unknown name, or NCCL off CUDA."""
    cuda = device.startswith("cuda")
    want = os.environ.get(TP_BACKEND_ENV, "").strip().lower()
    if not want:
        return "nccl" if cuda else "gloo"
    if want not in TP_BACKENDS:
        raise ValueError(f"{TP_BACKEND_ENV}={want!r}: expected one of {', '.join(TP_BACKENDS)}")
    if want == "nccl" and not cuda:
        raise ValueError(f"{TP_BACKEND_ENV}=nccl needs a CUDA device, not {device!r}")
    return want


def init_tp(
    rank: int, size: int, init_method: str, device: str = "cpu", timeout_s: float = 60.0
) -> dist.ProcessGroup | None:
    """Join the TP group (`init_method`: "tcp://host:port" or "file://path"); None for TP 1.
    Every rank of the group calls it; a missing peer fails after `timeout_s`."""
    if size == 1:
        return None
    if not dist.is_initialized():
        dist.init_process_group(
            backend_for(device),
            init_method=init_method,
            rank=rank,
            world_size=size,
            timeout=timedelta(seconds=timeout_s),
        )
    return dist.group.WORLD


def shutdown_tp() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
