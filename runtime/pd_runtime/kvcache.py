"""KV cache geometry: what one rank's paged caches look like, byte for byte.

Pure Python (no torch, no numpy). Everything is described in bytes so that the planner and the
kernels are dtype-agnostic: an fp8 cache is a cache with 1-byte elements plus a scale component.

Shapes follow vLLM 0.33 (vllm-nixl-rules.md §5, §13): one region per attention layer, K and V
packed in the last axis ("C"), layouts LBHNC (alias HND) and LBNHC (alias NHD). Per rank and
attention layer the tensor is

    HND: [num_blocks, heads_local, block_size, 2 * head_size]   (C = K then V)
    NHD: [num_blocks, block_size, heads_local, 2 * head_size]

MLA: one latent row per token, no heads, replicated on every TP rank:
    [num_blocks, block_size, kv_lora_rank + rope_dim]  (H = 1; HND and NHD are the same bytes)

Quantized caches (fp8, fp8_e4m3, fp8_e5m2): the data tensor above in 1-byte elements, and per
layer a float32 scale tensor laid out like the data with C = 2 (k_scale, v_scale; one for MLA):
"per-token-head" scales, which must travel with the data.

Sliding-window models: odd layers are sliding-window layers in their own KV-cache group; only
the last `sliding_window` tokens of a request are live there (blocks before the window are the
null block, id -1 in the block table).

Hybrid SSM (Mamba2-like): even layers are attention layers, odd layers are SSM layers whose state
is per request (one slot, never split by tokens). Per SSM layer, in the DS conv layout:
    conv_x: [slots, conv_kernel - 1, ssm_heads_local, ssm_head_dim]     (NHD-like, N = k - 1)
    conv_B: [slots, conv_kernel - 1, groups_local, d_state]
    conv_C: [slots, conv_kernel - 1, groups_local, d_state]
    ssm:    [slots, ssm_heads_local, 1, ssm_head_dim * d_state]  (float32)
The conv state is split per sub-projection across TP, the SSM state by head ("3-read" in vLLM).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

Layout = Literal["HND", "NHD"]
FAMILIES = ("dense", "moe", "mla", "sliding", "hybrid-ssm")
LAYOUT_ALIASES: dict[str, Layout] = {"HND": "HND", "NHD": "NHD", "LBHNC": "HND", "LBNHC": "NHD"}
DTYPE_BYTES = {
    "bfloat16": 2,
    "float16": 2,
    "float32": 4,
    "fp8": 1,
    "fp8_e4m3": 1,
    "fp8_e5m2": 1,
}
FP8_DTYPES = ("fp8", "fp8_e4m3", "fp8_e5m2")
ALIGN = 256

# KV-cache groups (each has its own block table in a request)
GROUP_FULL = 0
GROUP_SLIDING = 1
GROUP_STATE = 2


class GeometryError(ValueError):
    """A geometry that no rank can have (bad TP for the head count, unknown family...)."""


@dataclass(frozen=True)
class ModelSpec:
    """The model facts that decide the KV bytes (the same on P and D; hashed)."""

    family: str = "dense"
    num_layers: int = 2
    num_kv_heads: int = 8
    head_size: int = 128
    dtype: str = "bfloat16"  # model dtype (also the cache dtype unless cache_dtype says fp8)
    cache_dtype: str = "auto"  # auto | fp8 | fp8_e4m3 | fp8_e5m2
    kv_lora_rank: int = 512  # MLA
    rope_dim: int = 64  # MLA
    sliding_window: int = 0  # family sliding
    ssm_heads: int = 8  # hybrid-ssm
    ssm_head_dim: int = 64
    ssm_groups: int = 1
    d_state: int = 16
    conv_kernel: int = 4

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise GeometryError(f"unknown family {self.family!r}; supported: {', '.join(FAMILIES)}")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise GeometryError(
                f"model dtype {self.dtype!r} not supported (bfloat16, float16, float32)")
        if self.cache_dtype not in ("auto",) + FP8_DTYPES:
            raise GeometryError(f"cache dtype {self.cache_dtype!r} not supported")
        if self.family == "sliding" and self.sliding_window <= 0:
            raise GeometryError("family sliding needs sliding_window > 0")
        if self.num_layers < 1:
            raise GeometryError("num_layers must be >= 1")

    @property
    def quantized(self) -> bool:
        return self.cache_dtype in FP8_DTYPES

    @property
    def cache_elem_bytes(self) -> int:
        return 1 if self.quantized else DTYPE_BYTES[self.dtype]

    @property
    def mla(self) -> bool:
        return self.family == "mla"


@dataclass(frozen=True)
class Component:
    """One tensor of one layer, in bytes.

    A row is the `row_bytes` of one (token, head) pair. `heads` is the total count across TP;
    `split` says whether TP splits them (False: replicated, as MLA's latent). `paged` components
    are indexed by (block, token-in-block); state components by (slot, fixed position) with
    `state_len` positions and a fixed `state_layout`.
    """

    name: str
    layer: int
    group: int
    heads: int
    split: bool
    row_bytes: int
    paged: bool = True
    state_len: int = 1
    state_layout: Layout = "NHD"


def model_components(m: ModelSpec) -> list[Component]:
    """Every transferred tensor of the model, in region order."""
    comps: list[Component] = []
    e = m.cache_elem_bytes
    for layer in range(m.num_layers):
        if m.family == "mla":
            latent_bytes = (m.kv_lora_rank + m.rope_dim) * e
            comps.append(Component("latent", layer, GROUP_FULL, 1, False, latent_bytes))
            if m.quantized:
                comps.append(Component("latent_scale", layer, GROUP_FULL, 1, False, 4))
            continue
        if m.family == "hybrid-ssm" and layer % 2 == 1:
            el = DTYPE_BYTES[m.dtype]
            k1 = m.conv_kernel - 1
            heads, groups = m.ssm_heads, m.ssm_groups
            comps.append(Component("conv_x", layer, GROUP_STATE, heads, True, m.ssm_head_dim * el,
                                   False, k1, "NHD"))
            comps.append(Component("conv_B", layer, GROUP_STATE, groups, True, m.d_state * el,
                                   False, k1, "NHD"))
            comps.append(Component("conv_C", layer, GROUP_STATE, groups, True, m.d_state * el,
                                   False, k1, "NHD"))
            comps.append(Component("ssm", layer, GROUP_STATE, heads, True,
                                   m.ssm_head_dim * m.d_state * 4, False, 1, "HND"))
            continue
        group = GROUP_SLIDING if (m.family == "sliding" and layer % 2 == 1) else GROUP_FULL
        comps.append(Component("kv", layer, group, m.num_kv_heads, True, 2 * m.head_size * e))
        if m.quantized:
            comps.append(Component("kv_scale", layer, group, m.num_kv_heads, True, 8))
    return comps


def heads_of_rank(total: int, split: bool, tp: int, rank: int) -> list[int]:
    """Global head ids held by `rank` (vLLM: max(1, H // TP) per rank; replicated when TP > H)."""
    if not split:
        return list(range(total))
    if tp <= total:
        if total % tp:
            raise GeometryError(f"{total} heads cannot be split over TP {tp}")
        per = total // tp
        return list(range(rank * per, (rank + 1) * per))
    if tp % total:
        raise GeometryError(f"TP {tp} is not a multiple of {total} heads (replication)")
    return [rank // (tp // total)]


@dataclass(frozen=True)
class RankSpec:
    """One rank of one pool: the model, its TP placement, block size, layout and block counts."""

    model: ModelSpec
    tp_size: int = 1
    tp_rank: int = 0
    block_size: int = 16
    layout: str = "HND"
    num_blocks: int = 64  # per paged group
    num_state_slots: int = 8

    def __post_init__(self) -> None:
        if self.layout not in LAYOUT_ALIASES:
            raise GeometryError(f"unknown layout {self.layout!r}")
        object.__setattr__(self, "layout", LAYOUT_ALIASES[self.layout])
        if not (0 <= self.tp_rank < self.tp_size):
            raise GeometryError(f"tp_rank {self.tp_rank} outside TP {self.tp_size}")
        if self.block_size < 1:
            raise GeometryError("block_size must be >= 1")
        for c in model_components(self.model):
            heads_of_rank(c.heads, c.split, self.tp_size, 0)

    def with_rank(self, rank: int) -> RankSpec:
        return replace(self, tp_rank=rank)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> RankSpec:
        d = dict(d)
        d["model"] = ModelSpec(**d["model"])
        return RankSpec(**d)


@dataclass(frozen=True)
class Placement:
    """Where one component sits in the rank's arena and how to address a row of it."""

    comp: Component
    offset: int
    heads: tuple[int, ...]  # global head ids, in local order
    n_slots: int  # blocks (paged) or state slots
    n_pos: int  # block_size (paged) or state_len
    layout: Layout

    @property
    def nbytes(self) -> int:
        return self.n_slots * len(self.heads) * self.n_pos * self.comp.row_bytes

    @property
    def shape(self) -> tuple[int, int, int, int]:
        h = len(self.heads)
        if self.layout == "HND":
            return (self.n_slots, h, self.n_pos, self.comp.row_bytes)
        return (self.n_slots, self.n_pos, h, self.comp.row_bytes)

    def row_offset(self, slot: int, local_head: int, pos: int) -> int:
        h = len(self.heads)
        if self.layout == "HND":
            idx = (slot * h + local_head) * self.n_pos + pos
        else:
            idx = (slot * self.n_pos + pos) * h + local_head
        return self.offset + idx * self.comp.row_bytes


@dataclass(frozen=True)
class ArenaLayout:
    spec: RankSpec
    placements: tuple[Placement, ...] = field(default_factory=tuple)
    nbytes: int = 0


def arena_layout(spec: RankSpec) -> ArenaLayout:
    """One contiguous byte arena per rank holding every layer's tensors (NIXL registers it once)."""
    off = 0
    pls = []
    for c in model_components(spec.model):
        heads = tuple(heads_of_rank(c.heads, c.split, spec.tp_size, spec.tp_rank))
        if c.paged:
            pl = Placement(c, off, heads, spec.num_blocks, spec.block_size,
                           LAYOUT_ALIASES[spec.layout])
        else:
            pl = Placement(c, off, heads, spec.num_state_slots, c.state_len, c.state_layout)
        pls.append(pl)
        off += (pl.nbytes + ALIGN - 1) // ALIGN * ALIGN
    return ArenaLayout(spec, tuple(pls), max(off, ALIGN))


def kv_bytes_per_token(spec: RankSpec) -> int:
    """Paged bytes one token occupies on this rank (all layers; state excluded)."""
    placements = arena_layout(spec).placements
    return sum(len(p.heads) * p.comp.row_bytes for p in placements if p.comp.paged)


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


def live_token_range(m: ModelSpec, group: int, num_tokens: int) -> tuple[int, int]:
    """Tokens of a request whose KV lives in `group` (sliding-window layers keep the window)."""
    if group == GROUP_SLIDING:
        return (max(0, num_tokens - m.sliding_window), num_tokens)
    return (0, num_tokens)


def groups_of(m: ModelSpec) -> list[int]:
    return sorted({c.group for c in model_components(m)})


def make_block_table(m: ModelSpec, group: int, num_tokens: int, block_size: int,
                     ids: list[int]) -> list[int]:
    """Block table of a request for `group` from a list of free block ids; -1 for null blocks."""
    if group == GROUP_STATE:
        return [ids[0]]
    n = blocks_needed(num_tokens, block_size)
    lo, _ = live_token_range(m, group, num_tokens)
    first_live = lo // block_size
    return [ids[i] if i >= first_live else -1 for i in range(n)]
