"""Per-geometry transfer templates: the plan computed once per (P rank, D rank) geometry pair.

The planner (planner.py) builds byte segments per request in numpy. Here the same plan is split
into what depends only on the geometry and what depends on the request:

* static, per pair (built once, cached, uploaded once): one *entity* per (component, head read,
  power-of-two piece of the row), with the arena address of (block 0, position 0), the block
  stride, the position stride, the block size, and the staging offset as an affine function of
  the request's token counts (n_full, n_sliding; state components have constant counts);
* per request: the token counts (three integers) and the block tables (one int64 tensor).

The kernels (kernels/kvcopy.py) compute every row's addresses on the device from
(entity, token) -> block table lookup, so no offset table is built or moved per request.

The staging order is exactly the planner's (per component in region order; [head][token] when P's
placement is HND, [token][head] otherwise), so the bytes in a slot are identical to what the
planner's gather segments produce; the unit tests check that.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from .kvcache import GROUP_FULL, GROUP_STATE, RankSpec, arena_layout, live_token_range
from .planner import (
    PlanError,
    Request,
    check_pairing,
    expected_consumers,
    release_assignments,
    source_map,
)

KIND_FULL, KIND_SLIDING, KIND_STATE = 0, 1, 2
# entity columns (bytes until the class converts them to words)
C_KIND, C_CF, C_CS, C_CK, C_LTS, C_PBASE, C_PBS, C_PPS, C_BS, C_NC, C_SIZE = range(11)
NCOL = 11
MAX_PIECE = 1 << 13


@dataclass
class Dyn:
    """What one request contributes: token counts and the block tables (int64, concatenated)."""

    n_full: int
    n_sliding: int
    lo_sliding: int
    off_sliding: int
    off_state: int
    tables: np.ndarray

    def counts(self, kind: int, nconst: int = 0) -> int:
        if kind == KIND_FULL:
            return self.n_full
        return self.n_sliding if kind == KIND_SLIDING else nconst


def as_table(bt: Any, what: str = "block table") -> np.ndarray:
    """A block table as int64. A list goes through struct (about 3x faster than np.asarray on a
    list of Python ints); an int64 array is used as is."""
    if isinstance(bt, np.ndarray):
        return bt if bt.dtype == np.int64 else bt.astype(np.int64)
    if isinstance(bt, list | tuple):
        try:
            return np.frombuffer(struct.pack(f"={len(bt)}q", *bt), np.int64)
        except (struct.error, TypeError):
            raise PlanError(f"{what}: not a list of 64-bit integers") from None
    try:
        return np.asarray(bt, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise PlanError(f"{what}: not a sequence of 64-bit integers") from None


def _table(side: str, spec: RankSpec, req: Request, group: int, lo: int, hi: int) -> np.ndarray:
    """The group's block table as int64, its live part checked (same rules as the planner)."""
    bt = req.block_tables.get(group)
    if bt is None:
        raise PlanError(f"{side}: request has no block table for KV-cache group {group}")
    a = as_table(bt, f"{side}: block table of group {group}")
    n_slots = spec.num_state_slots if group == GROUP_STATE else spec.num_blocks
    if group == GROUP_STATE:
        if a.size != 1 or not (0 <= a[0] < n_slots):
            raise PlanError(f"{side}: state group needs exactly one slot id in [0, {n_slots})")
        return a
    if hi > lo:
        need = (hi - 1) // spec.block_size + 1
        if a.size < need:
            raise PlanError(f"{side}: block table of group {group} has {a.size} blocks, "
                            f"{need} needed for {hi} tokens")
        live = a[lo // spec.block_size : need]
        # numpy's min/max: Python's builtin ones iterate an array element by element (0.5 ms
        # at 2048 blocks, most of the per-pull growth with the table)
        if live.size and (int(live.min()) < 0 or int(live.max()) >= n_slots):
            b = int(live[(live < 0) | (live >= n_slots)][0])
            raise PlanError(f"{side}: block id {b} outside [0, {n_slots}) in group {group}")
    return a


class SideTables:
    """The static entity table of one side (P's arena for the gather, D's for the scatter)."""

    def __init__(self, ent: np.ndarray, groups: list[int]):
        self.ent = ent  # [E, NCOL] int64, bytes
        self.groups = groups  # KV-cache groups present
        self.classes: dict[tuple, Any] = {}  # (device, use_triton) -> prepared kernel classes


class PairTemplate:
    """The transfer between P rank p.tp_rank and D rank d.tp_rank, for any request."""

    def __init__(self, p: RankSpec, d: RankSpec):
        check_pairing(p, d)
        self.p, self.d = p, d
        self.m = p.model
        pa, da = arena_layout(p), arena_layout(d)
        smap = source_map(p, d)
        g_rows: list[list[int]] = []
        s_rows: list[list[int]] = []
        cur = np.zeros(3, np.int64)  # staging cursor = cur . (n_full, n_sliding, 1)
        self.rows_coef = np.zeros(3, np.int64)
        groups: set[int] = set()
        for ci, (ppl, dpl) in enumerate(zip(pa.placements, da.placements, strict=True)):
            heads = smap[(ci, 0)].get(p.tp_rank)
            if not heads:
                continue
            c = ppl.comp
            if c.paged:
                kind = KIND_SLIDING if c.group != GROUP_FULL else KIND_FULL
                nconst = 0
            else:
                kind, nconst = KIND_STATE, c.state_len
            groups.add(c.group)
            hs = sorted(heads)
            nh = len(hs)
            rb = c.row_bytes
            unit = np.zeros(3, np.int64)  # the component's token count as (n_full, n_sliding, 1)
            unit[kind if kind != KIND_STATE else 2] = 1 if kind != KIND_STATE else nconst
            for hi, h in enumerate(hs):
                if ppl.layout == "HND":
                    lin = cur + hi * rb * unit
                    lts = rb
                else:
                    lin = cur.copy()
                    lin[2] += hi * rb
                    lts = nh * rb
                jp = ppl.heads.index(h)
                jd = dpl.heads.index(h)
                side = []
                for pl, j in ((ppl, jp), (dpl, jd)):
                    nhl = len(pl.heads)
                    if pl.layout == "HND":
                        side.append((pl.offset + j * pl.n_pos * rb, nhl * pl.n_pos * rb, rb,
                                     pl.n_pos))
                    else:
                        side.append((pl.offset + j * rb, pl.n_pos * nhl * rb, nhl * rb, pl.n_pos))
                # pieces of the row (MAX_PIECE, then one per set bit) so each kernel class has a
                # power-of-two row width
                pieces, rem = [], rb
                while rem >= MAX_PIECE:
                    pieces.append(MAX_PIECE)
                    rem -= MAX_PIECE
                pieces += [1 << b for b in range(12, -1, -1) if rem & (1 << b)]
                col = 0
                for size in pieces:
                    for rows_out, (base, bstr, pstr, bs) in ((g_rows, side[0]), (s_rows, side[1])):
                        rows_out.append([kind, lin[0], lin[1], lin[2] + col, lts, base + col,
                                         bstr, pstr, bs, nconst, size])
                    col += size
            cur = cur + nh * rb * unit
            self.rows_coef = self.rows_coef + nh * unit
        self.bytes_coef = cur
        self.empty = not g_rows
        ge = np.asarray(g_rows, np.int64).reshape(-1, NCOL)
        se = np.asarray(s_rows, np.int64).reshape(-1, NCOL)
        self.gather = SideTables(ge, sorted(groups))
        self.scatter = SideTables(se, sorted(groups))
        self.groups = sorted(groups)
        self.has_sliding = any(g != GROUP_FULL and g != GROUP_STATE for g in groups)
        self.expected = expected_consumers(p, d, p.tp_rank)

    # ------------------------------------------------------------------------------------------
    def counts(self, T: int) -> tuple[int, int, int]:
        """(n_full, n_sliding, lo_sliding) for a request of T tokens."""
        if not self.has_sliding:
            return T, T, 0
        lo = max(0, T - self.m.sliding_window)
        return T, T - lo, lo

    def nbytes(self, T: int) -> int:
        nf, ns, _ = self.counts(T)
        return int(self.bytes_coef[0] * nf + self.bytes_coef[1] * ns + self.bytes_coef[2])

    def rows(self, T: int) -> int:
        nf, ns, _ = self.counts(T)
        return int(self.rows_coef[0] * nf + self.rows_coef[1] * ns + self.rows_coef[2])

    def dyn(self, side: str, req: Request, T: int) -> Dyn:
        """Check a request's block tables on one side ("prefill" or "decode") and pack them."""
        spec = self.p if side == "prefill" else self.d
        nf, ns, lo = self.counts(T)
        if self.groups == [GROUP_FULL]:  # the common case: one table
            return Dyn(nf, ns, lo, 0, 0, _table(side, spec, req, GROUP_FULL, 0, T))
        parts = {}
        for g in self.groups:
            if g == GROUP_STATE:
                parts[g] = _table(side, spec, req, g, 0, 1)
            else:
                glo, ghi = live_token_range(self.m, g, T)
                parts[g] = _table(side, spec, req, g, glo, ghi)
        tabs, off, offs = [], 0, {}
        for g in (GROUP_FULL, 1, GROUP_STATE):
            offs[g] = off
            if g in parts:
                tabs.append(parts[g])
                off += parts[g].size
        tables = np.concatenate(tabs) if tabs else np.zeros(1, np.int64)
        if tables.size == 0:
            tables = np.zeros(1, np.int64)
        return Dyn(nf, ns, lo, offs[1], offs[GROUP_STATE], tables)


class TemplateCache:
    """PairTemplates keyed by (P rank spec, D rank spec); thread-safe; built on first use."""

    def __init__(self):
        self._c: dict[tuple, PairTemplate | None] = {}
        self._rel: dict[tuple, list[int]] = {}
        self._lock = threading.Lock()

    def get(self, p: RankSpec, d: RankSpec) -> PairTemplate | None:
        key = (p, d)
        t = self._c.get(key)
        if t is None and key not in self._c:
            t = PairTemplate(p, d)
            if t.empty:
                t = None
            with self._lock:
                self._c[key] = t
        return t

    def release_only(self, p_pool: RankSpec, d: RankSpec) -> list[int]:
        key = (p_pool, d)
        r = self._rel.get(key)
        if r is None:
            r = release_assignments(p_pool, d)[d.tp_rank]
            self._rel[key] = r
        return r
