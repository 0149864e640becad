"""Tensor-parallel process groups for the model: gloo on CPU, NCCL on CUDA, bounded timeouts."""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist


def backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


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
