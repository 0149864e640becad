"""Gather / scatter kernels that execute the planner's byte segments.

`SegmentProgram.prepare(segments, device)` turns a plan's segments into device-side tables once;
`program.run(src, dst)` then moves the bytes between two flat uint8 tensors. On CUDA it is one
fused Triton launch per row-width class (gather + head-split + block remap + HND/NHD permute all
live in the offsets); elsewhere (CPU, or CUDA without Triton) a torch index copy does the same.

The worker uses `kvcopy.KVProgram` instead: per-geometry templates (../template.py) whose row
addresses are computed on the device from the block tables, so nothing is planned per request.
`SegmentProgram` stays as the executor of the planner's segments (reference, tests, bench).
"""

from .segcopy import SegmentProgram, triton_available

__all__ = ["SegmentProgram", "triton_available"]
