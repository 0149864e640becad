"""Gather / scatter kernels that execute the planner's byte segments.

`SegmentProgram.prepare(segments, device)` turns a plan's segments into device-side tables once;
`program.run(src, dst)` then moves the bytes between two flat uint8 tensors. On CUDA it is one
fused Triton launch per row-width class (gather + head-split + block remap + HND/NHD permute all
live in the offsets); elsewhere (CPU, or CUDA without Triton) a torch index copy does the same.
"""

from .segcopy import SegmentProgram, triton_available

__all__ = ["SegmentProgram", "triton_available"]
