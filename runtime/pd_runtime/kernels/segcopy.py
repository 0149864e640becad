"""Segment copy: dst[d : d + n] = src[s : s + n] for many (s, d, n), torch and Triton."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from ..planner import Segments

_WORD = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
MAX_PIECE_BYTES = 8192  # pieces longer than this are cut (one Triton row of the tile)
# bytes one Triton program copies
TILE_BYTES = int(os.environ.get("PD_RUNTIME_TILE_BYTES", "32768"))
NUM_WARPS = int(os.environ.get("PD_RUNTIME_NUM_WARPS", "16"))  # 0: pick by tile size

try:  # Triton is optional (CPU CI has it with torch, but it needs a GPU to run)
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except Exception:  # pragma: no cover
    _HAVE_TRITON = False


def triton_available(device: torch.device | str) -> bool:
    return _HAVE_TRITON and torch.device(device).type == "cuda"


if _HAVE_TRITON:

    @triton.jit
    def _segcopy_kernel(src, dst, soff, doff, n, U: tl.constexpr, BS: tl.constexpr,
                        VEC: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid.to(tl.int64) * BS + tl.arange(0, BS)
        rmask = rows < n
        so = tl.load(soff + rows, mask=rmask, other=0)
        do = tl.load(doff + rows, mask=rmask, other=0)
        so = tl.multiple_of(so, VEC)
        do = tl.multiple_of(do, VEC)
        cols = tl.arange(0, U)
        m = rmask[:, None]
        v = tl.load(src + (so[:, None] + cols[None, :]), mask=m, cache_modifier=".cg")
        tl.store(dst + (do[:, None] + cols[None, :]), v, mask=m, cache_modifier=".cs")


def _pow2_divisor(a: np.ndarray, cap: int) -> int:
    v = int(np.bitwise_or.reduce(a)) if a.size else cap
    g = 1
    while g < cap and v % (2 * g) == 0:
        g *= 2
    return g


@dataclass
class _Class:
    word: int  # bytes per word
    unit: int  # words per piece
    vec: int  # offsets are multiples of this many words
    soff: torch.Tensor  # int64, in words
    doff: torch.Tensor
    idx_s: torch.Tensor | None = None  # torch path: per-word indices
    idx_d: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return int(self.soff.numel())


class SegmentProgram:
    """A plan's segments, prepared for one device. Offsets are absolute in src and dst."""

    def __init__(self, classes: list[_Class], nbytes: int, device: torch.device, use_triton: bool):
        self.classes = classes
        self.nbytes = nbytes
        self.device = device
        self.use_triton = use_triton

    @property
    def launches(self) -> int:
        return len(self.classes)

    @staticmethod
    def prepare(seg: Segments, device: torch.device | str = "cpu",
                use_triton: bool | None = None) -> SegmentProgram:
        device = torch.device(device)
        if use_triton is None:
            use_triton = triton_available(device)
        src = np.asarray(seg.src, np.int64)
        dst = np.asarray(seg.dst, np.int64)
        ln = np.asarray(seg.length, np.int64)
        # cut long segments into pieces of at most MAX_PIECE_BYTES
        if ln.size and ln.max() > MAX_PIECE_BYTES:
            k = (ln + MAX_PIECE_BYTES - 1) // MAX_PIECE_BYTES
            rep = np.repeat(np.arange(ln.size), k)
            first = np.repeat(np.cumsum(k) - k, k)
            j = np.arange(rep.size) - first
            src = src[rep] + j * MAX_PIECE_BYTES
            dst = dst[rep] + j * MAX_PIECE_BYTES
            ln = np.minimum(ln[rep] - j * MAX_PIECE_BYTES, MAX_PIECE_BYTES)
        # binary decomposition: a segment of n bytes becomes one piece per set bit of n, so each
        # class (bit) holds pieces of one size and a Triton tile needs no column mask
        classes: list[_Class] = []
        for b in range(int(np.log2(MAX_PIECE_BYTES)), -1, -1):
            size = 1 << b
            sel = ((ln >> b) & 1).astype(bool)
            if not sel.any():
                continue
            within = (ln[sel] >> (b + 1)) << (b + 1)
            s, d = src[sel] + within, dst[sel] + within
            word = min(8, _pow2_divisor(np.concatenate([s, d, np.array([size])]), 8))
            ps, pd = s // word, d // word
            unit = size // word
            vec = min(_pow2_divisor(np.concatenate([ps, pd]), max(1, 16 // word)), unit)
            c = _Class(word, unit, vec, torch.from_numpy(ps).to(device),
                       torch.from_numpy(pd).to(device))
            if not use_triton:
                cols = torch.arange(unit, dtype=torch.int64, device=device)
                c.idx_s = (c.soff[:, None] + cols[None, :]).reshape(-1)
                c.idx_d = (c.doff[:, None] + cols[None, :]).reshape(-1)
            classes.append(c)
        return SegmentProgram(classes, int(ln.sum()) if ln.size else 0, device, use_triton)

    def run(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy the bytes (src, dst: flat contiguous uint8 tensors on this program's device)."""
        assert src.dtype == torch.uint8 and dst.dtype == torch.uint8
        for c in self.classes:
            sw = src.view(_WORD[c.word])
            dw = dst.view(_WORD[c.word])
            if self.use_triton:
                bs = max(1, min(1024, TILE_BYTES // (c.unit * c.word)))
                grid = (triton.cdiv(c.n, bs),)
                nw = NUM_WARPS or (8 if bs * c.unit * c.word >= 8192 else 4)
                _segcopy_kernel[grid](sw, dw, c.soff, c.doff, c.n, U=c.unit, BS=bs, VEC=c.vec,
                                      num_warps=nw)
            else:
                dw[c.idx_d] = sw[c.idx_s]
