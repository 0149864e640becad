"""Template-driven gather / scatter: row addresses computed on the device from the block tables.

A `KVProgram` is prepared once per (pair template, side, device): its entity tables live on the
device. Per request `run()` uploads the block tables (one small int64 copy) and launches one
Triton kernel per row-width class (usually one: K+V rows; fp8 scales and non-power-of-two rows add
a class each). Each program copies TT rows of one entity; a row's paged address is
base + table[t // block] * block_stride + (t % block) * pos_stride, its staging address is affine
in the request's token counts. No per-request offset tables exist.

Elsewhere (CPU, or CUDA without Triton) the same addresses are built with torch ops and copied
with an index copy.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from ..switches import env_choice
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
    NCOL,
    Dyn,
    SideTables,
)
from .segcopy import _HAVE_TRITON, triton_available

# 16 KiB tiles, 8 warps: on an H200 89-91% of a copy at 64 MiB in every case against 82-89% for
# 32 KiB, 93-94% against 91-94% at 512 MiB-1 GiB, equal at 32 MiB (three interleaved rounds,
# bench/transfer/results/h200_run1{6,7}_tiles.json; docs/performance.md)
KV_TILE_BYTES = int(os.environ.get("PD_RUNTIME_KV_TILE_BYTES", "16384"))
KV_NUM_WARPS = int(os.environ.get("PD_RUNTIME_KV_NUM_WARPS", "8"))
KV_LAUNCHES = ("direct", "jit")
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
    # compiled kernels launched without the JIT's dispatch, by their specialization (_launch)
    compiled: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.ent_np.shape[0])

    @property
    def tt(self) -> int:
        t = max(1, min(1024, KV_TILE_BYTES // (self.unit * self.word)))
        return 1 << (t.bit_length() - 1)

    def nmax(self, dyn: Dyn) -> int:
        return max(dyn.counts(k, self.nconst) for k in self.kinds)


class KVProgram:
    """One side's entity tables on one device; `run` moves one request's rows."""

    def __init__(self, side: SideTables, device: torch.device | str, gather: bool,
                 use_triton: bool | None = None, direct: bool | None = None):
        """`direct`: launch the compiled Triton kernel without the JIT's dispatch (`_launch`);
        None reads PD_RUNTIME_KV_LAUNCH."""
        self.device = torch.device(device)
        self.gather = gather
        self.use_triton = triton_available(self.device) if use_triton is None else use_triton
        self.direct = (env_choice("PD_RUNTIME_KV_LAUNCH", KV_LAUNCHES, "direct") == "direct"
                       if direct is None else direct)
        self.classes: list[_KClass] = []
        ent = side.ent
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
            self.classes.append(_KClass(word, unit, vec, kinds, ent_dev, ew,
                                        int(ew[:, C_NC].max())))

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
            if self.use_triton:
                tt = c.tt if nmax >= c.tt else max(1, triton.next_power_of_2(nmax))
                self._launch(c, ((nmax + tt - 1) // tt, c.n, 1), (sw, dw, c.ent, bt),
                             (NCOL, c.unit, tt, c.vec, w, self.gather))
            else:
                self._torch(c, sw, dw, bt[HDR:], dyn, lin_add // c.word, nmax)

    def _launch(self, c: _KClass, grid: tuple[int, int, int], ptrs: tuple, consts: tuple) -> None:
        """Launch `_kv_kernel`. Triton's JIT binds the arguments, builds a specialization key and
        looks the kernel up on every call: 10-41 µs of host time a launch more than launching
        the compiled kernel on an H200 machine (bench/transfer/results/h200_run2{4,5,6}_launch
        .json), paid on P's engine thread at hold() and in every pull. So the compiled kernel is
        kept under the key the JIT would build (the constexprs, TT the only one that varies,
        which pointers are 16-byte aligned: the compiled code assumes what it saw, and the
        current device: the kernel is loaded there) and launched directly. Triton's
        interpreter returns no compiled kernel: every launch goes through the JIT there."""
        key, direct = None, None
        if self.direct:  # the JIT path builds no key of its own
            key = (consts[2], *(p.data_ptr() % 16 == 0 for p in ptrs),
                   torch.cuda.current_device() if self.device.type == "cuda" else -1)
            direct = c.compiled.get(key)
            if direct is not None and direct.launch(grid, ptrs, consts):
                return
        nc, rb, tt, vec, word, gather = consts
        k = _kv_kernel[grid[:2]](*ptrs, NC=nc, RB=rb, TT=tt, VEC=vec, WORD=word, GATHER=gather,
                                 num_warps=KV_NUM_WARPS)
        if key is not None and direct is None and k is not None and hasattr(k, "run"):
            c.compiled[key] = _Direct(k)

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


class _Direct:
    """A compiled Triton kernel and how its launcher takes arguments: since Triton 3.3 every
    argument in order, constexprs included (the launcher skips them); before, only the others.
    The launcher checks the count, so the wrong form raises TypeError before anything runs; a
    kernel that takes neither is left to the JIT (`launch` returns False)."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.form: str | None = None  # "all" | "plain" | "none", found at the first launch

    def launch(self, grid: tuple[int, int, int], ptrs: tuple, consts: tuple) -> bool:
        run = self.kernel[grid]
        if self.form is None:
            for form, args in (("all", ptrs + consts), ("plain", ptrs)):
                try:
                    run(*args)
                except TypeError:
                    continue
                self.form = form
                return True
            self.form = "none"
            return False
        if self.form == "none":
            return False
        run(*(ptrs + consts) if self.form == "all" else ptrs)
        return True


def program_for(side: SideTables, device: torch.device | str, gather: bool,
                use_triton: bool | None = None) -> KVProgram:
    """Cached per (side table, device, path)."""
    key = (str(torch.device(device)), gather, use_triton)
    p = side.classes.get(key)
    if p is None:
        p = KVProgram(side, device, gather, use_triton)
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
    ev = queued_work(device)
    if ev is not None:
        ev.synchronize()


TRANSFER_STREAMS = ("priority", "engine")


def transfer_stream(device: torch.device | str) -> torch.cuda.Stream | None:
    """The stream a rank's transfer kernels run on (P's gathers; D's table uploads and
    scatters): on CUDA one of their own at the highest priority, unless
    PD_RUNTIME_TRANSFER_STREAM=engine (the previous path, kept to measure against). On the
    engine's stream they queue behind whatever the engine launched before them: on P the next
    prefill (103 ms of a 105 ms pull under load, H200 run 10), on D the decode steps.

    Safe without further ordering because nothing else touches what they write: P's gather
    reads a held request's blocks (ordered after the kernels that wrote them by `queued_work`,
    recorded at hold()) into its own staging slot; D's scatter writes blocks that no kernel
    reads before the pull ends (the engine's step loop is synchronous, a pulling request joins
    a step only afterwards, there is no prefix sharing, and padded graph rows repeat row 0)."""
    raw = env_choice("PD_RUNTIME_TRANSFER_STREAM", TRANSFER_STREAMS, "priority")
    if raw == "engine" or not str(device).startswith("cuda"):
        return None
    # (lowest, highest): the highest is the most negative; a static method that torch's stubs
    # declare as an instance method
    _, hi = torch.cuda.Stream.priority_range()  # type: ignore[call-arg]
    return torch.cuda.Stream(torch.device(device), priority=hi)


def queued_work(device: torch.device | str) -> torch.cuda.Event | None:
    """An event after the work queued so far on this thread's current stream (on P: the kernels
    that wrote a finished prefill's KV), for a gather on another stream to wait on."""
    if not str(device).startswith("cuda"):
        return None
    ev = torch.cuda.Event()
    ev.record(torch.cuda.current_stream(torch.device(device)))
    return ev


@contextlib.contextmanager
def on_stream(stream: torch.cuda.Stream | None, after: torch.cuda.Event | None) -> Iterator[None]:
    """Queue the block's work on `stream` (None: the current stream), after `after`."""
    if stream is None:
        yield
        return
    if after is not None:
        stream.wait_event(after)
    with torch.cuda.stream(stream):
        yield
