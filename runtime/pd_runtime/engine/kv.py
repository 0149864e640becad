"""The paged KV cache as typed views over the transfer engine's byte arena.

The arena is the `torch.uint8` tensor PrefillRank / DecodeRank register with NIXL;
`kvcache.arena_layout` says where each layer's tensor sits. Here each paged component becomes a
token-major view `[blocks, block_size, heads_local, C]` (for HND a permuted view of
`[blocks, heads_local, block_size, C]`: the bytes stay where the transfer engine expects them).
Rows are read and written by (block id, offset in block) index tensors, so one gather or scatter
per layer serves a whole batch.

fp8 caches store per-(token, head) float32 scales beside the data (kvcache.py: C = 2 for K / V,
1 for an MLA latent); quantizing is amax / fp8-max per row part.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import kvcache

TORCH_DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


class KVCacheError(ValueError):
    """An arena or a block table the cache cannot use (wrong size, null block that is needed)."""


@dataclass
class LayerCache:
    """One layer's paged tensor (token-major view) and, for fp8, its scales."""

    layer: int
    group: int
    parts: int  # rows are `parts` equal pieces, each with its own scale (K,V: 2; latent: 1)
    data: torch.Tensor  # [blocks, block_size, heads_local, C], cache dtype
    scale: torch.Tensor | None  # [blocks, block_size, heads_local, parts] float32, fp8 only

    def put(self, blk: torch.Tensor, off: torch.Tensor, rows: torch.Tensor) -> None:
        """Store rows [N, heads_local, C] at (blk[i], off[i])."""
        if self.scale is None:
            self.data[blk, off] = rows.to(self.data.dtype)
            return
        q, s = quantize(rows, self.parts, self.data.dtype)
        self.data[blk, off] = q
        self.scale[blk, off] = s

    def get(self, blk: torch.Tensor, off: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows at (blk, off) (any index shape S) as [*S, heads_local, C] in `dtype`."""
        rows = self.data[blk, off]
        if self.scale is None:
            return rows.to(dtype)
        return dequantize(rows, self.scale[blk, off], self.parts, dtype)

    def round_trip(self, rows: torch.Tensor) -> torch.Tensor:
        """`rows` as they read back after `put` (what attention must see for fresh tokens)."""
        if self.scale is None:
            return rows.to(self.data.dtype).to(rows.dtype)
        q, s = quantize(rows, self.parts, self.data.dtype)
        return dequantize(q, s, self.parts, rows.dtype)


def quantize(
    rows: torch.Tensor, parts: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 rows and float32 scales [..., parts] (one scale per piece of each row)."""
    shape = rows.shape
    x = rows.float().reshape(*shape[:-1], parts, shape[-1] // parts)
    fmax = torch.finfo(dtype).max
    scale = (x.abs().amax(dim=-1) / fmax).clamp(min=1e-12)
    q = (x / scale.unsqueeze(-1)).clamp(-fmax, fmax).to(dtype)
    return q.reshape(shape), scale


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, parts: int, dtype: torch.dtype
) -> torch.Tensor:
    shape = q.shape
    x = q.float().reshape(*shape[:-1], parts, shape[-1] // parts) * scale.unsqueeze(-1)
    return x.reshape(shape).to(dtype)


def _view(arena: torch.Tensor, pl: kvcache.Placement, dtype: torch.dtype) -> torch.Tensor:
    """Token-major typed view [slots, positions, heads, elements] of one placement."""
    elem = torch.empty((), dtype=dtype).element_size()
    raw = arena[pl.offset : pl.offset + pl.nbytes].view(dtype)
    n, a, b, row = pl.shape
    t = raw.view(n, a, b, row // elem)
    return t.permute(0, 2, 1, 3) if pl.layout == "HND" else t


@dataclass
class LayerState:
    """One Mamba-2 layer's per-request state slots (kvcache.py's DS conv layout).

    conv_*: the last conv_kernel - 1 inputs of the causal conv, split into its x / B / C parts;
    ssm: the recurrent state, float32, [slots, heads_local, head_dim * d_state].
    """

    layer: int
    conv_x: torch.Tensor  # [slots, k - 1, ssm_heads_local, ssm_head_dim]
    conv_b: torch.Tensor  # [slots, k - 1, groups_local, d_state]
    conv_c: torch.Tensor  # [slots, k - 1, groups_local, d_state]
    ssm: torch.Tensor  # [slots, ssm_heads_local, ssm_head_dim * d_state]


class KVCache:
    """Every paged layer of one rank, viewed over `arena` (uint8, arena_layout(spec).nbytes)."""

    def __init__(self, spec: kvcache.RankSpec, arena: torch.Tensor):
        layout = kvcache.arena_layout(spec)
        if arena.dtype != torch.uint8 or arena.dim() != 1 or not arena.is_contiguous():
            raise KVCacheError("the arena must be a contiguous 1-D torch.uint8 tensor")
        if arena.numel() < layout.nbytes:
            raise KVCacheError(f"arena has {arena.numel()} bytes, the layout needs {layout.nbytes}")
        self.spec = spec
        self.arena = arena
        self.block_size = spec.block_size
        self.num_blocks = spec.num_blocks
        m = spec.model
        data_dtype = TORCH_DTYPES[m.cache_dtype if m.quantized else m.dtype]
        self.layers: dict[int, LayerCache] = {}
        self.states: dict[int, LayerState] = {}
        self.num_state_slots = spec.num_state_slots
        state: dict[int, dict[str, torch.Tensor]] = {}
        scales = {p.comp.layer: p for p in layout.placements if p.comp.name.endswith("_scale")}
        for pl in layout.placements:
            c = pl.comp
            if c.group == kvcache.GROUP_STATE:
                dt = torch.float32 if c.name == "ssm" else TORCH_DTYPES[m.dtype]
                state.setdefault(c.layer, {})[c.name] = _view(arena, pl, dt)
                continue
            if c.name not in ("kv", "latent"):
                continue  # scales are attached to their data below
            parts = 2 if c.name == "kv" else 1
            sc = scales.get(c.layer)
            scale = _view(arena, sc, torch.float32) if sc is not None else None
            self.layers[c.layer] = LayerCache(
                c.layer, c.group, parts, _view(arena, pl, data_dtype), scale
            )

        for layer, t in state.items():
            self.states[layer] = LayerState(
                layer, t["conv_x"], t["conv_B"], t["conv_C"], t["ssm"][:, 0]
            )

    @staticmethod
    def allocate(spec: kvcache.RankSpec, device: str = "cpu") -> KVCache:
        """A fresh zeroed arena for `spec` (tests, offline generation)."""
        nbytes = kvcache.arena_layout(spec).nbytes
        return KVCache(spec, torch.zeros(nbytes, dtype=torch.uint8, device=device))


def chunk_block_table(
    m: kvcache.ModelSpec, group: int, start_pos: int, end_pos: int, block_size: int, ids: list[int]
) -> list[int]:
    """The block table a chunk of tokens [start_pos, end_pos) needs in `group`.

    Full groups: every block. Sliding groups: blocks entirely before the first key the chunk's
    first query attends to (start_pos - window + 1) may be null (-1), as vLLM's sliding-window
    manager frees them; `kvcache.make_block_table(m, group, n, ...)` tables (P's hand-over) are
    valid for a 1-token chunk at n - 1.
    """
    n = kvcache.blocks_needed(end_pos, block_size)
    if len(ids) < n:
        raise KVCacheError(f"{len(ids)} block ids for {n} blocks")
    if group != kvcache.GROUP_SLIDING:
        return list(ids[:n])
    first_needed = max(0, start_pos - m.sliding_window + 1) // block_size
    return [ids[i] if i >= first_needed else -1 for i in range(n)]
