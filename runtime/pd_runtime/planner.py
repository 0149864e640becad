"""Transfer planner: the exact bytes each decode rank reads from each prefill rank.

Pure (numpy only, no torch). Given the prefill (P) and decode (D) pools' geometry and one
request's block tables on both sides, it returns for each (D rank, P rank) pair:

* the gather: byte segments (offset in P's arena -> offset in P's staging slot), which P's
  gather kernel runs, so that the slot holds the pair's bytes contiguously;
* the READ: one contiguous range of `nbytes` in that slot, one NIXL descriptor;
* the scatter: byte segments (offset in D's staging -> offset in D's arena), which D's scatter
  kernel runs after the READ.

Everything is token-granular, so any TP pair whose sizes each fit the head count (head split,
head merge, replication with one source per head), any two block sizes, and any two layouts
(HND/NHD, both ways) plan the same way. MLA (replicated) is read once per D rank, from one P
rank; P ranks that nobody reads get a release notification instead.

The worker does not call this per request: template.py derives a per-geometry template with the
same staging order (tests/unit/runtime/test_template.py checks they agree byte for byte).

Staging order for a pair, per component in region order: if P's placement is head-major (HND)
rows go [head][token], otherwise [token][head]; so the gather side merges into block-long runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .kvcache import (
    GROUP_STATE,
    GeometryError,
    Placement,
    RankSpec,
    arena_layout,
    live_token_range,
)


class PlanError(ValueError):
    """The request or the pairing cannot be planned (with the reason)."""


@dataclass(frozen=True)
class Request:
    """A request as one side sees it: token count and block table per KV-cache group."""

    num_tokens: int
    block_tables: dict[int, list[int]]


@dataclass
class Segments:
    """Byte copies: dst[dst_off : dst_off + length] = src[src_off : src_off + length]."""

    src: np.ndarray
    dst: np.ndarray
    length: np.ndarray

    @property
    def count(self) -> int:
        return int(self.length.size)

    @property
    def nbytes(self) -> int:
        return int(self.length.sum()) if self.length.size else 0

    def shifted(self, src_by: int = 0, dst_by: int = 0) -> Segments:
        return Segments(self.src + src_by, self.dst + dst_by, self.length)

    @staticmethod
    def concat(parts: list[Segments]) -> Segments:
        if not parts:
            z = np.zeros(0, np.int64)
            return Segments(z, z.copy(), z.copy())
        return Segments(
            np.concatenate([p.src for p in parts]),
            np.concatenate([p.dst for p in parts]),
            np.concatenate([p.length for p in parts]),
        )

    def granularity(self) -> int:
        """Largest power of two (<= 16) dividing every offset and length."""
        g = 16
        for a in (self.src, self.dst, self.length):
            if a.size:
                v = int(np.bitwise_or.reduce(a))
                while g > 1 and v % g:
                    g //= 2
        return g


@dataclass
class PeerPlan:
    d_rank: int
    p_rank: int
    nbytes: int  # one READ of this many bytes from the start of P's slot
    gather: Segments  # P arena -> P slot (dst relative to the slot start)
    scatter: Segments  # D staging (src relative to the received range) -> D arena
    rows: int = 0


@dataclass
class DRankPlan:
    d_rank: int
    peers: dict[int, PeerPlan] = field(default_factory=dict)
    release_only: list[int] = field(default_factory=list)  # P ranks to notify without reading

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.peers.values())


# --------------------------------------------------------------------------------------------
# pairing


def check_pairing(p: RankSpec, d: RankSpec) -> None:
    """Raise PlanError when this runtime cannot move KV between the two pools."""
    if p.model != d.model:
        diff = [k for k in p.model.__dataclass_fields__
                if getattr(p.model, k) != getattr(d.model, k)]
        raise PlanError(f"prefill and decode model geometry differ: {', '.join(diff)}")
    try:
        arena_layout(p)
        arena_layout(d)
    except GeometryError as e:  # pragma: no cover - RankSpec validates already
        raise PlanError(str(e)) from e


def head_holders(total: int, split: bool, tp: int, head: int) -> list[int]:
    """P ranks holding global head `head`."""
    if not split:
        return list(range(tp))
    if tp <= total:
        return [head // (total // tp)]
    rep = tp // total
    return list(range(head * rep, (head + 1) * rep))


def source_map(p: RankSpec, d: RankSpec) -> dict[tuple[int, int], dict[int, list[int]]]:
    """For D rank d.tp_rank: {(component index): {p_rank: [global heads read from it]}}."""
    out: dict[tuple[int, int], dict[int, list[int]]] = {}
    dl = arena_layout(d)
    for ci, pl in enumerate(dl.placements):
        c = pl.comp
        per: dict[int, list[int]] = {}
        for h in pl.heads:
            holders = head_holders(c.heads, c.split, p.tp_size, h)
            src = holders[d.tp_rank % len(holders)]
            per.setdefault(src, []).append(h)
        out[(ci, 0)] = per
    return out


def readers_of(p: RankSpec, d: RankSpec) -> dict[int, set[int]]:
    """{p_rank: D ranks that READ from it} over the whole D pool."""
    readers: dict[int, set[int]] = {r: set() for r in range(p.tp_size)}
    for dr in range(d.tp_size):
        for per in source_map(p, d.with_rank(dr)).values():
            for pr in per:
                readers[pr].add(dr)
    return readers


def release_assignments(p: RankSpec, d: RankSpec) -> dict[int, list[int]]:
    """{d_rank: P ranks it notifies without reading}: every P rank nobody reads (MLA, replicas)."""
    readers = readers_of(p, d)
    out: dict[int, list[int]] = {r: [] for r in range(d.tp_size)}
    for pr, rs in readers.items():
        if not rs:
            out[pr % d.tp_size].append(pr)
    return out


def expected_consumers(p: RankSpec, d: RankSpec, p_rank: int) -> int:
    """Notifications P rank `p_rank` waits for before it frees a request's blocks."""
    readers = readers_of(p, d)[p_rank]
    if readers:
        return len(readers)
    return 1  # one release notification


# --------------------------------------------------------------------------------------------
# rows


def _check_table(side: str, spec: RankSpec, req: Request, group: int, lo: int,
                 hi: int) -> list[int]:
    bt = req.block_tables.get(group)
    if bt is None:
        raise PlanError(f"{side}: request has no block table for KV-cache group {group}")
    n_slots = spec.num_state_slots if group == GROUP_STATE else spec.num_blocks
    if group == GROUP_STATE:
        if len(bt) != 1 or not (0 <= bt[0] < n_slots):
            raise PlanError(f"{side}: state group needs exactly one slot id in [0, {n_slots})")
        return bt
    if hi > lo:
        need = (hi - 1) // spec.block_size + 1
        if len(bt) < need:
            raise PlanError(f"{side}: block table of group {group} has {len(bt)} blocks, "
                            f"{need} needed for {hi} tokens")
        live = bt[lo // spec.block_size : need]
        for b in live:
            if not (0 <= b < n_slots):
                raise PlanError(f"{side}: block id {b} outside [0, {n_slots}) in group {group}")
    return bt


def _row_offsets(pl: Placement, spec: RankSpec, bt: list[int], heads: np.ndarray,
                 tok: np.ndarray) -> np.ndarray:
    """Byte offsets of rows (heads x tokens as given by broadcasting) in the rank's arena."""
    lut = np.full(max(pl.heads) + 1, -1, dtype=np.int64)
    lut[list(pl.heads)] = np.arange(len(pl.heads))
    j = lut[heads]
    if pl.comp.paged:
        table = np.asarray(bt, dtype=np.int64)
        slot = table[tok // spec.block_size]
        pos = tok % spec.block_size
    else:
        slot = np.full_like(tok, bt[0])
        pos = tok
    nh = len(pl.heads)
    if pl.layout == "HND":
        idx = (slot * nh + j) * pl.n_pos + pos
    else:
        idx = (slot * pl.n_pos + pos) * nh + j
    return pl.offset + idx * pl.comp.row_bytes


def _merge(src: np.ndarray, dst: np.ndarray, length: np.ndarray) -> Segments:
    """Coalesce rows whose source and destination both continue the previous row."""
    if src.size == 0:
        z = np.zeros(0, np.int64)
        return Segments(z, z.copy(), z.copy())
    cont = np.ones(src.size, dtype=bool)
    cont[0] = False
    cont[1:] = (src[:-1] + length[:-1] == src[1:]) & (dst[:-1] + length[:-1] == dst[1:])
    starts = np.flatnonzero(~cont)
    return Segments(src[starts].copy(), dst[starts].copy(), np.add.reduceat(length, starts))


def plan_peer(p: RankSpec, d: RankSpec, p_req: Request, d_req: Request) -> PeerPlan | None:
    """The pair (D rank d.tp_rank, P rank p.tp_rank); None when D reads nothing from that P rank."""
    check_pairing(p, d)
    if p_req.num_tokens != d_req.num_tokens:
        raise PlanError(
            f"token counts differ: prefill {p_req.num_tokens}, decode {d_req.num_tokens}")
    T = p_req.num_tokens
    pa, da = arena_layout(p), arena_layout(d)
    smap = source_map(p, d)
    src_all, stage_all, dst_all, len_all = [], [], [], []
    cursor = 0
    rows = 0
    for ci, (ppl, dpl) in enumerate(zip(pa.placements, da.placements, strict=True)):
        heads = smap[(ci, 0)].get(p.tp_rank)
        if not heads:
            continue
        c = ppl.comp
        if c.paged:
            lo, hi = live_token_range(p.model, c.group, T)
        else:
            lo, hi = 0, c.state_len
        if hi <= lo:
            continue
        pbt = _check_table("prefill", p, p_req, c.group, lo, hi)
        dbt = _check_table("decode", d, d_req, c.group, lo, hi)
        hs = np.asarray(sorted(heads), dtype=np.int64)
        ts = np.arange(lo, hi, dtype=np.int64)
        if ppl.layout == "HND":
            H2, T2 = np.meshgrid(hs, ts, indexing="ij")
        else:
            T2, H2 = np.meshgrid(ts, hs, indexing="ij")
        H, Tt = H2.ravel(), T2.ravel()
        so = _row_offsets(ppl, p, pbt, H, Tt)
        do = _row_offsets(dpl, d, dbt, H, Tt)
        n = so.size
        src_all.append(so)
        stage_all.append(cursor + np.arange(n, dtype=np.int64) * c.row_bytes)
        dst_all.append(do)
        len_all.append(np.full(n, c.row_bytes, dtype=np.int64))
        cursor += n * c.row_bytes
        rows += n
    if not src_all:
        return None
    p_off = np.concatenate(src_all)
    s_off = np.concatenate(stage_all)
    d_off = np.concatenate(dst_all)
    ln = np.concatenate(len_all)
    gather = _merge(p_off, s_off, ln)
    scatter = _merge(s_off, d_off, ln)
    return PeerPlan(d.tp_rank, p.tp_rank, cursor, gather, scatter, rows)


def plan_d_rank(p: RankSpec, d: RankSpec, p_req: Request, d_req: Request) -> DRankPlan:
    """Everything D rank d.tp_rank does for one request: its reads and its release notices."""
    out = DRankPlan(d.tp_rank)
    for pr in range(p.tp_size):
        pp = plan_peer(p.with_rank(pr), d, p_req, d_req)
        if pp is not None:
            out.peers[pr] = pp
    out.release_only = release_assignments(p, d)[d.tp_rank]
    return out


def descriptor_count_per_block_baseline(p: RankSpec, d: RankSpec, num_tokens: int) -> int:
    """Descriptors NixlConnector would post for one (request, P rank) pair: regions x blocks
    (x split count for P > D). Used only to report the comparison."""
    layers = p.model.num_layers
    blocks = (num_tokens + p.block_size - 1) // p.block_size
    return layers * blocks
