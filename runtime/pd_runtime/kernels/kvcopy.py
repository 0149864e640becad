"""Template-driven gather / scatter: row addresses computed on the device from the block tables.

A `KVProgram` is prepared once per (pair template, side, device): its entity tables live on the
device. Per request `run()` uploads the block tables (one small int64 copy) and launches one
Triton kernel per row-width class (usually one: K+V rows; fp8 scales and non-power-of-two rows add
a class each). Each program copies TT rows of one entity; a row's paged address is
base + table[t // block] * block_stride + (t % block) * pos_stride, its staging address is affine
in the request's token counts. No per-request offset tables exist.

Two Triton kernels, chosen per program (`kernel=`) or by PD_RUNTIME_KV_KERNEL:

* "v1" (default): the template kernel measured in docs/performance.md.
* "v2" (opt-in, PD_RUNTIME_KV_KERNEL=v2): token arithmetic in int32, the block size and the
  entity kind as compile-time constants where a class has one value, entities whose rows sit side
  by side on both sides (NHD heads) merged into one wider row, about 64 bytes per thread (16 warps
  for a 32 KiB tile): 32-40 registers a thread on sm_90 against v1's 112. Measured on an H200
  side by side (bench/transfer/results/h200_run5_kernels.json) it did not beat v1: better for the
  equal-TP gather at 64-128 MiB, worse for the head split at 64 MiB and the scatter at 512 MiB,
  so v1 stays the default. A v2 build failure warns and falls back to v1 (KVProgram.fallback).

Elsewhere (CPU, or CUDA without Triton) the same addresses are built with torch ops and copied
with an index copy.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..template import (
    C_BS,
    C_CF,
    C_CK,
    C_CS,
    C_KIND,
    C_LTS,
    C_NC,
    C_PBASE,
    C_PBS,
    C_PPS,
    C_SIZE,
    KIND_FULL,
    KIND_SLIDING,
    MAX_PIECE,
    NCOL,
    Dyn,
    SideTables,
)
from .segcopy import _HAVE_TRITON, triton_available

KV_TILE_BYTES = int(os.environ.get("PD_RUNTIME_KV_TILE_BYTES", "32768"))
KV_NUM_WARPS = int(os.environ.get("PD_RUNTIME_KV_NUM_WARPS", "8"))  # v1
KV_KERNEL = os.environ.get("PD_RUNTIME_KV_KERNEL", "v1")  # "v1" (default) or "v2"
# v2: warps per program (0: one warp per 2 KiB of tile, so about 64 bytes per thread, at most 16)
KV2_NUM_WARPS = int(os.environ.get("PD_RUNTIME_KV2_NUM_WARPS", "0"))
# v2: programs ordered entity-fastest (neighbouring heads of one token range run together)
KV2_ENT_FAST = os.environ.get("PD_RUNTIME_KV2_ENT_FAST", "1") != "0"
KV2_MERGE = os.environ.get("PD_RUNTIME_KV2_MERGE", "1") != "0"  # v2: merge side-by-side rows
KERNELS = ("v1", "v2")
KV2_FALLBACK = os.environ.get("PD_RUNTIME_KV2_FALLBACK", "1") != "0"
FALLBACKS: list[str] = []  # v2 build failures that fell back to v1 (the GPU tests assert none)
_WORD = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_ADDR_COLS = [C_CF, C_CS, C_CK, C_LTS, C_PBASE, C_PBS, C_PPS, C_SIZE]
HDR = 8  # int64 header in front of the block tables (see _kv_kernel)

if _HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _kv_kernel(src, dst, ent, bt, NC: tl.constexpr, RB: tl.constexpr, TT: tl.constexpr,
                   VEC: tl.constexpr, WORD: tl.constexpr, GATHER: tl.constexpr):
        # bt: [n_full, n_sliding, lo_sliding, off_sliding, off_state, lin_add (bytes), 0, 0,
        #      tables...]
        # (request scalars travel with the tables: one upload, and no recompile per token count)
        tile = tl.program_id(0)
        e = tl.program_id(1).to(tl.int64)
        nF = tl.load(bt + 0)
        nS = tl.load(bt + 1)
        loS = tl.load(bt + 2)
        offS = tl.load(bt + 3)
        offSt = tl.load(bt + 4)
        lin_add = tl.load(bt + 5) // WORD
        row = ent + e * NC
        kind = tl.load(row + 0)
        cf = tl.load(row + 1)
        cs = tl.load(row + 2)
        ck = tl.load(row + 3)
        lts = tl.load(row + 4)
        pbase = tl.load(row + 5)
        pbs = tl.load(row + 6)
        pps = tl.load(row + 7)
        bs = tl.load(row + 8)
        nc = tl.load(row + 9)
        n = tl.where(kind == 0, nF, tl.where(kind == 1, nS, nc))
        lo = tl.where(kind == 1, loS, 0)
        boff = 8 + tl.where(kind == 0, 0, tl.where(kind == 1, offS, offSt))  # 8 = HDR
        tt = tile.to(tl.int64) * TT + tl.arange(0, TT)
        m = tt < n
        t = lo + tt
        blk = tl.load(bt + boff + t // bs, mask=m, other=0)
        pg = pbase + blk * pbs + (t % bs) * pps
        lin = lin_add + cf * nF + cs * nS + ck + tt * lts
        if GATHER:
            so = pg
            do = lin
        else:
            so = lin
            do = pg
        so = tl.multiple_of(so, VEC)
        do = tl.multiple_of(do, VEC)
        cols = tl.arange(0, RB)
        mm = m[:, None]
        v = tl.load(src + (so[:, None] + cols[None, :]), mask=mm, cache_modifier=".cg")
        tl.store(dst + (do[:, None] + cols[None, :]), v, mask=mm, cache_modifier=".cs")

    @triton.jit
    def _kv_kernel2(src, dst, ent, bt, NC: tl.constexpr, RB: tl.constexpr, TT: tl.constexpr,
                    VEC: tl.constexpr, WORD: tl.constexpr, GATHER: tl.constexpr,
                    BS: tl.constexpr, KIND: tl.constexpr, EFAST: tl.constexpr):
        # Same addresses as _kv_kernel, fewer registers: BS > 0 is the class's one block size
        # (0: read per entity), KIND 0: every entity of the class is a full-attention one (-1:
        # read per entity); token indices are int32.
        if EFAST:
            e = tl.program_id(0).to(tl.int64)
            tile = tl.program_id(1)
        else:
            tile = tl.program_id(0)
            e = tl.program_id(1).to(tl.int64)
        row = ent + e * NC
        nF = tl.load(bt + 0)
        nS = tl.load(bt + 1)
        lin_add = tl.load(bt + 5) // WORD
        cf = tl.load(row + 1)
        cs = tl.load(row + 2)
        ck = tl.load(row + 3)
        lts = tl.load(row + 4)
        pbase = tl.load(row + 5)
        pbs = tl.load(row + 6)
        pps = tl.load(row + 7)
        if KIND == 0:
            n = nF.to(tl.int32)
            lo = 0
            boff = 8  # HDR
        else:
            kind = tl.load(row + 0)
            n = tl.where(kind == 0, nF, tl.where(kind == 1, nS, tl.load(row + 9))).to(tl.int32)
            lo = tl.where(kind == 1, tl.load(bt + 2), 0).to(tl.int32)
            boff = 8 + tl.where(kind == 0, 0, tl.where(kind == 1, tl.load(bt + 3),
                                                        tl.load(bt + 4)))
        tt = tile * TT + tl.arange(0, TT)
        m = tt < n
        t = lo + tt
        if BS > 0:
            bi = t // BS
            r = t - bi * BS
        else:
            bs = tl.load(row + 8).to(tl.int32)
            bi = t // bs
            r = t - bi * bs
        blk = tl.load(bt + boff + bi, mask=m, other=0)
        pg = pbase + blk * pbs + r.to(tl.int64) * pps
        lin = (lin_add + cf * nF + cs * nS + ck) + tt.to(tl.int64) * lts
        if GATHER:
            so = pg
            do = lin
        else:
            so = lin
            do = pg
        so = tl.multiple_of(so, VEC)
        do = tl.multiple_of(do, VEC)
        cols = tl.arange(0, RB)
        mm = m[:, None]
        v = tl.load(src + (so[:, None] + cols[None, :]), mask=mm, cache_modifier=".cg")
        tl.store(dst + (do[:, None] + cols[None, :]), v, mask=mm, cache_modifier=".cs")


def merge_rows(ent: np.ndarray, cap: int = MAX_PIECE) -> np.ndarray:
    """Entities whose rows sit side by side on both sides (the next one's arena and staging
    addresses are this one's plus its row width; every other column equal) become one entity
    with a wider row: the same byte moves, fewer and longer rows (NHD heads: 512 B rows at a
    2 KiB stride become contiguous 2 KiB rows). Runs are cut into power-of-two counts of at
    most `cap` bytes, so each row width stays a power of two."""
    if ent.shape[0] < 2:
        return ent
    same = [C_KIND, C_CF, C_CS, C_LTS, C_PBS, C_PPS, C_BS, C_NC, C_SIZE]
    a, b = ent[:-1], ent[1:]
    adj = ((a[:, same] == b[:, same]).all(axis=1) & (b[:, C_CK] == a[:, C_CK] + a[:, C_SIZE])
           & (b[:, C_PBASE] == a[:, C_PBASE] + a[:, C_SIZE]))
    if not adj.any():
        return ent
    out = []
    i, n = 0, ent.shape[0]
    while i < n:
        j = i
        while j < n - 1 and adj[j]:
            j += 1
        run, size = j - i + 1, int(ent[i, C_SIZE])
        while run:
            k = 1
            while 2 * k <= run and 2 * k * size <= cap:
                k *= 2
            r = ent[i].copy()
            r[C_SIZE] = k * size
            out.append(r)
            i += k
            run -= k
    return np.asarray(out, np.int64).reshape(-1, ent.shape[1])


def _pow2_div(vals: np.ndarray, cap: int) -> int:
    v = int(np.bitwise_or.reduce(np.abs(vals))) if vals.size else cap
    g = 1
    while g < cap and v % (2 * g) == 0:
        g *= 2
    return g


@dataclass
class _KClass:
    word: int
    unit: int  # words per row piece
    vec: int
    kinds: tuple[int, ...]
    ent: torch.Tensor  # [E, NCOL] int64 on device (address columns in words)
    ent_np: np.ndarray
    nconst: int = 0
    bs: int = 0  # the class's one block size (0: several)
    kind: int = -1  # 0: every entity is full attention (-1: read per entity)

    @property
    def n(self) -> int:
        return int(self.ent_np.shape[0])

    @property
    def tt(self) -> int:
        t = max(1, min(1024, KV_TILE_BYTES // (self.unit * self.word)))
        return 1 << (t.bit_length() - 1)

    def tile_rows(self, tile_bytes: int) -> int:
        t = max(1, min(1024, tile_bytes // (self.unit * self.word)))
        return 1 << (t.bit_length() - 1)

    def nmax(self, dyn: Dyn) -> int:
        return max(dyn.counts(k, self.nconst) for k in self.kinds)


class KVProgram:
    """One side's entity tables on one device; `run` moves one request's rows."""

    def __init__(self, side: SideTables, device: torch.device | str, gather: bool,
                 use_triton: bool | None = None, kernel: str | None = None,
                 merge: bool | None = None):
        self.device = torch.device(device)
        self.gather = gather
        self.use_triton = triton_available(self.device) if use_triton is None else use_triton
        self.kernel = kernel or KV_KERNEL
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel {self.kernel!r}: one of {KERNELS}")
        # v2 launch settings (the module's defaults; the bench sets them per program)
        self.tile_bytes = KV_TILE_BYTES
        self.num_warps = KV2_NUM_WARPS
        self.ent_fast = KV2_ENT_FAST
        self.maxnreg: int | None = None
        # a v2 build failure falls back to v1 with a warning (recorded in FALLBACKS); the bench
        # and the GPU tests turn this off so that a failure shows
        self.fallback = KV2_FALLBACK
        self.classes: list[_KClass] = []
        ent = side.ent
        if self.kernel == "v2" and (KV2_MERGE if merge is None else merge):
            ent = merge_rows(ent)
        for size in sorted({int(x) for x in ent[:, C_SIZE]}, reverse=True):
            e = ent[ent[:, C_SIZE] == size].copy()
            word = min(8, _pow2_div(np.concatenate([e[:, _ADDR_COLS].ravel(), [256]]), 8))
            ew = e.copy()
            ew[:, _ADDR_COLS] //= word
            unit = size // word
            addr = ew[:, [C_CF, C_CS, C_CK, C_LTS, C_PBASE, C_PBS, C_PPS]].ravel()
            vec = min(_pow2_div(np.concatenate([addr, [256 // word]]), max(1, 16 // word)), unit)
            kinds = tuple(sorted({int(k) for k in ew[:, C_KIND]}))
            ent_dev = torch.from_numpy(ew).to(self.device)
            bss = {int(x) for x in ew[:, C_BS]}
            self.classes.append(_KClass(word, unit, vec, kinds, ent_dev, ew,
                                        int(ew[:, C_NC].max()),
                                        bs=bss.pop() if len(bss) == 1 else 0,
                                        kind=KIND_FULL if kinds == (KIND_FULL,) else -1))

    @property
    def launches(self) -> int:
        return len(self.classes)

    def upload(self, dyn: Dyn, lin_add: int = 0) -> torch.Tensor:
        """Request scalars + block tables as one int64 tensor on the device (one small copy)."""
        return upload_all(self.device, [(dyn, lin_add)])[0]

    def run(self, src: torch.Tensor, dst: torch.Tensor, dyn: Dyn, lin_add: int = 0,
            bt: torch.Tensor | None = None) -> None:
        """Gather: src = P arena, dst = staging (lin_add = slot offset). Scatter: src = received
        bytes (lin_add = their offset), dst = D arena. Flat contiguous uint8 tensors. `bt`: a
        tensor from upload(dyn, lin_add), or None to upload here."""
        assert src.dtype == torch.uint8 and dst.dtype == torch.uint8
        if bt is None:
            bt = self.upload(dyn, lin_add)
        for c in self.classes:
            assert lin_add % c.word == 0
            w = c.word
            sw = src[: src.numel() // w * w].view(_WORD[w])
            dw = dst[: dst.numel() // w * w].view(_WORD[w])
            nmax = c.nmax(dyn)
            if nmax <= 0:
                continue
            if self.use_triton and self.kernel == "v2":
                try:
                    self._launch2(c, sw, dw, bt, nmax)
                    continue
                except Exception as e:  # a compile failure (raised here, before any launch)
                    if not self.fallback:
                        raise
                    FALLBACKS.append(f"{type(e).__name__}: {e}")
                    warnings.warn(f"kvcopy: the v2 kernel failed to build ({type(e).__name__}: "
                                  f"{e}); this program uses v1 from now on", stacklevel=2)
                    self.kernel = "v1"  # v1 takes the same (merged) class tables
            if self.use_triton:
                tt = c.tt if nmax >= c.tt else max(1, triton.next_power_of_2(nmax))
                grid = (triton.cdiv(nmax, tt), c.n)
                _kv_kernel[grid](sw, dw, c.ent, bt, NC=NCOL, RB=c.unit, TT=tt, VEC=c.vec, WORD=w,
                                 GATHER=self.gather, num_warps=KV_NUM_WARPS)
            else:
                self._torch(c, sw, dw, bt[HDR:], dyn, lin_add // c.word, nmax)

    def _launch2(self, c: _KClass, sw, dw, bt, nmax: int) -> None:
        ct = c.tile_rows(self.tile_bytes)
        tt = ct if nmax >= ct else max(1, triton.next_power_of_2(nmax))
        nw = self.num_warps or max(1, min(16, tt * c.unit * c.word // 2048))
        ntile = triton.cdiv(nmax, tt)
        efast = self.ent_fast and ntile < 65536
        grid = (c.n, ntile) if efast else (ntile, c.n)
        extra = {} if self.maxnreg is None else {"maxnreg": self.maxnreg}
        _kv_kernel2[grid](sw, dw, c.ent, bt, NC=NCOL, RB=c.unit, TT=tt, VEC=c.vec, WORD=c.word,
                          GATHER=self.gather, BS=c.bs, KIND=c.kind, EFAST=efast, num_warps=nw,
                          **extra)

    def _torch(self, c: _KClass, sw, dw, bt, dyn: Dyn, lin_add: int, nmax: int) -> None:
        e = c.ent
        col = lambda k: e[:, k][:, None]  # noqa: E731
        kind = col(C_KIND)
        n = torch.where(kind == KIND_FULL, dyn.n_full,
                        torch.where(kind == KIND_SLIDING, dyn.n_sliding, col(C_NC)))
        lo = torch.where(kind == KIND_SLIDING, dyn.lo_sliding, 0)
        boff = torch.where(kind == KIND_FULL, 0,
                           torch.where(kind == KIND_SLIDING, dyn.off_sliding, dyn.off_state))
        tt = torch.arange(nmax, dtype=torch.int64, device=e.device)[None, :]
        m = tt < n
        t = lo + tt
        idx = torch.where(m, boff + t // col(C_BS), 0)
        blk = bt.to(e.device)[idx]
        pg = col(C_PBASE) + blk * col(C_PBS) + (t % col(C_BS)) * col(C_PPS)
        lin = (lin_add + col(C_CF) * dyn.n_full + col(C_CS) * dyn.n_sliding + col(C_CK)
               + tt * col(C_LTS))
        so, do = (pg, lin) if self.gather else (lin, pg)
        so, do = so[m], do[m]
        cols = torch.arange(c.unit, dtype=torch.int64, device=e.device)
        dw[(do[:, None] + cols).reshape(-1)] = sw[(so[:, None] + cols).reshape(-1)]


def program_for(side: SideTables, device: torch.device | str, gather: bool,
                use_triton: bool | None = None, kernel: str | None = None) -> KVProgram:
    """Cached per (side table, device, path, kernel)."""
    kernel = kernel or KV_KERNEL
    key = (str(torch.device(device)), gather, use_triton, kernel)
    p = side.classes.get(key)
    if p is None:
        p = KVProgram(side, device, gather, use_triton, kernel)
        side.classes[key] = p
    return p


class _Pinned(threading.local):
    """This thread's page-locked staging for table uploads, and the event of its last copy.
    Pinned: a copy from pageable memory first waits for the stream's queued work (the engine's
    kernels) and goes through a driver bounce buffer; from pinned memory it is queued and
    returns. Per thread: P serves several decode ranks on side-channel threads at once."""

    buf: torch.Tensor | None = None
    done: torch.cuda.Event | None = None


_PINNED = _Pinned()


def _headed(dyn: Dyn, lin_add: int, out: np.ndarray) -> None:
    out[:HDR] = (dyn.n_full, dyn.n_sliding, dyn.lo_sliding, dyn.off_sliding, dyn.off_state,
                 lin_add, 0, 0)
    out[HDR:] = dyn.tables


def upload_all(device: torch.device, items: list[tuple[Dyn, int]]) -> list[torch.Tensor]:
    """One int64 tensor per (dyn, lin_add) on `device` (header + tables, see _kv_kernel); on
    CUDA all of them travel in one copy from a pinned buffer (one launch for every peer)."""
    if device.type != "cuda" and len(items) == 1:  # the common CPU case, without the loop
        host = np.empty(HDR + items[0][0].tables.size, np.int64)
        _headed(*items[0], host)
        return [torch.from_numpy(host)]
    sizes = [HDR + dyn.tables.size for dyn, _ in items]
    total = sum(sizes)
    if device.type != "cuda":
        host = np.empty(total, np.int64)
    else:
        st = _PINNED
        if st.done is not None:
            st.done.synchronize()  # the buffer's last copy has left it (long since, as a rule)
        if st.buf is None or st.buf.numel() < total:
            st.buf = torch.empty(max(total, 2 * (0 if st.buf is None else st.buf.numel()), 4096),
                                 dtype=torch.int64, pin_memory=True)
        host = st.buf.numpy()[:total]
    off = 0
    for (dyn, lin_add), n in zip(items, sizes, strict=True):
        _headed(dyn, lin_add, host[off : off + n])
        off += n
    if device.type != "cuda":
        flat = torch.from_numpy(host)
    else:
        assert _PINNED.buf is not None
        flat = torch.empty(total, dtype=torch.int64, device=device)
        flat.copy_(_PINNED.buf[:total], non_blocking=True)
        _PINNED.done = torch.cuda.Event()
        _PINNED.done.record(torch.cuda.current_stream(device))
    if len(sizes) == 1:
        return [flat]
    out, off = [], 0
    for n in sizes:
        out.append(flat[off : off + n])
        off += n
    return out


def wait_device(device: torch.device | str) -> None:
    """Wait for the work this thread queued (its current stream), not the whole device: a
    device-wide synchronize also waits for the engine's own kernels on other streams."""
    if not str(device).startswith("cuda"):
        return
    ev = torch.cuda.Event()
    ev.record(torch.cuda.current_stream(torch.device(device)))
    ev.synchronize()
