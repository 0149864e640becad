"""Brute-force reference: the logical per-token KV, and where it sits in a rank's arena.

Independent of the planner: it never computes byte offsets by hand. It views each component of a
rank's arena as the numpy tensor vLLM would have ([slots, H, N, C] for HND, [slots, N, H, C] for
NHD) and indexes it with (block, head, token-in-block), so a planner bug in offset arithmetic,
head selection, block remap or layout permutation shows up as a byte mismatch.

Logical KV of a request: for every component (region order) an array [positions, heads_total,
row_bytes] of uint8, where positions are the request's tokens (paged) or the state positions.
"""

from __future__ import annotations

import numpy as np

from .kvcache import GROUP_STATE, RankSpec, arena_layout, live_token_range, model_components
from .planner import Request


def logical_shapes(spec: RankSpec, num_tokens: int) -> list[tuple[int, int, int]]:
    out = []
    for c in model_components(spec.model):
        n = num_tokens if c.paged else c.state_len
        out.append((n, c.heads, c.row_bytes))
    return out


def random_logical(spec: RankSpec, num_tokens: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=s, dtype=np.uint8) for s in logical_shapes(spec, num_tokens)]


def random_arena(spec: RankSpec, seed: int) -> np.ndarray:
    nbytes = arena_layout(spec).nbytes
    return np.random.default_rng(seed).integers(0, 256, size=nbytes, dtype=np.uint8)


def _view(arena: np.ndarray, pl) -> np.ndarray:
    return arena[pl.offset : pl.offset + pl.nbytes].reshape(pl.shape)


def _positions(spec: RankSpec, comp, req: Request) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, slot per token, position in slot) of the live part of the request."""
    if comp.paged:
        lo, hi = live_token_range(spec.model, comp.group, req.num_tokens)
        t = np.arange(lo, hi)
        bt = np.asarray(req.block_tables[comp.group])
        return t, bt[t // spec.block_size] if t.size else t, t % spec.block_size
    t = np.arange(comp.state_len)
    return t, np.full(t.size, req.block_tables[GROUP_STATE][0]), t


def store(spec: RankSpec, arena: np.ndarray, req: Request, logical: list[np.ndarray]) -> None:
    """Write the logical KV of the request into `arena` as rank `spec` holds it."""
    for pl, lg in zip(arena_layout(spec).placements, logical, strict=True):
        v = _view(arena, pl)
        t, slot, pos = _positions(spec, pl.comp, req)
        for j, h in enumerate(pl.heads):
            if pl.layout == "HND":
                v[slot, j, pos] = lg[t, h]
            else:
                v[slot, pos, j] = lg[t, h]


def load(spec: RankSpec, arena: np.ndarray, req: Request, num_tokens: int) -> list[np.ndarray]:
    """Read back the logical KV held by rank `spec` (heads it does not hold stay zero)."""
    out = []
    shapes = logical_shapes(spec, num_tokens)
    for pl, shp in zip(arena_layout(spec).placements, shapes, strict=True):
        lg = np.zeros(shp, np.uint8)
        v = _view(arena, pl)
        t, slot, pos = _positions(spec, pl.comp, req)
        for j, h in enumerate(pl.heads):
            lg[t, h] = v[slot, j, pos] if pl.layout == "HND" else v[slot, pos, j]
        out.append(lg)
    return out


def expected_decode_arena(d: RankSpec, initial: np.ndarray, req: Request,
                          logical: list[np.ndarray]) -> np.ndarray:
    """D rank's arena after a correct transfer: the initial bytes with the request's KV stored."""
    out = initial.copy()
    store(d, out, req, logical)
    return out


def apply_segments(src: np.ndarray, dst: np.ndarray, seg) -> None:
    """Plain numpy execution of a Segments list (reference executor for planner tests)."""
    for s, o, n in zip(seg.src.tolist(), seg.dst.tolist(), seg.length.tolist(), strict=True):
        dst[o : o + n] = src[s : s + n]
