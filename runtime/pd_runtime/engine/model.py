"""The decoder-only transformer: dense GQA, MoE, MLA and sliding-window layers, TP-sharded.

Plain tensors and functions (no nn.Module): weights come from the full Hugging Face state dict,
are sliced for this TP rank at construction (column-parallel: rows of q/k/v, gate/up, per-head
MLA up-projections; row-parallel: columns of o_proj / down_proj, followed by one all_reduce), and
every layer runs on all tokens of a step at once. Attention itself (paged reads and writes, the
masks of a batch) is given by `AttnMeta` from the runner.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .. import kvcache
from ..switches import env_choice
from .config import ModelConfig
from .kv import KVCache, LayerCache
from .ssm import Mamba2Mixer, StateChunk

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


class WeightError(ValueError):
    """A checkpoint tensor that is missing or has the wrong shape; the message names it."""


@dataclass
class AttnMeta:
    """How one (KV group, window) pair of a step reads and writes the paged cache.

    B sequences, padded to Lq query tokens and Lc cached keys each; T real tokens in flat order.
    """

    q_index: torch.Tensor  # [B, Lq] flat token index (pads: 0, masked out or discarded)
    out_index: torch.Tensor  # [T] index of each flat token in the [B * Lq] padded order
    cache_blk: torch.Tensor  # [B, Lc] block ids of cached keys (pads point at a real block)
    cache_off: torch.Tensor  # [B, Lc]
    write_sel: torch.Tensor  # [W] flat tokens whose block is not null
    write_blk: torch.Tensor  # [W]
    write_off: torch.Tensor  # [W]
    mask: torch.Tensor | None  # [B, 1, Lq, Lc + Lq] bool, None: one causal sequence, no cache
    # Split steps (CUDA): 1-token chunks go to the paged decode kernel (`paged`); the fields
    # above then describe only the other chunks, whose flat tokens are `sdpa_rows` (None: none),
    # except write_*, which still cover every token of the step.
    paged: PagedMeta | None = None
    sdpa_rows: torch.Tensor | None = None


@dataclass
class PagedMeta:
    """The decode tokens of a step, attended by kernels.paged_decode (block table read in place)."""

    rows: torch.Tensor | None  # [D] flat token index of each decode token (None: all, in order)
    table: torch.Tensor  # [D, W] block ids (pads: any valid id, never read)
    seq_lens: torch.Tensor  # [D] keys per decode token, itself included (written before)
    window: int  # 0: every key; > 0: the last `window` keys
    num_splits: int
    tokens_per_split: int


class Sharder:
    """Slices full tensors for one TP rank."""

    def __init__(
        self,
        weights: dict[str, torch.Tensor],
        rank: int,
        size: int,
        dtype: torch.dtype,
        device: str,
    ):
        self.w, self.rank, self.size, self.dtype, self.device = weights, rank, size, dtype, device
        # Row-parallel partial sums are formed and all-reduced in float32 under TP, then rounded
        # once: 16-bit partials would round twice and drift from TP 1's greedy tokens.
        self.partial_dtype = torch.float32 if size > 1 else dtype

    def has(self, name: str) -> bool:
        return name in self.w

    def full(self, name: str) -> torch.Tensor:
        if name not in self.w:
            raise WeightError(f"checkpoint has no tensor {name!r}")
        return self.w[name].to(device=self.device, dtype=self.dtype)

    def opt(self, name: str) -> torch.Tensor | None:
        return self.full(name) if name in self.w else None

    def rows(self, t: torch.Tensor, index: list[int] | None = None, parts: int = 1) -> torch.Tensor:
        """Row slice (output features) of `t` for this rank: an explicit row index, or an even
        split of each of `parts` stacked pieces."""
        if index is not None:
            if index == list(range(t.shape[0])):
                return t  # TP 1: the tensor itself, no copy
            return t[torch.tensor(index, device=t.device)].contiguous()
        n = t.shape[0] // parts
        if n % self.size:
            raise WeightError(f"{n} output features cannot be split over TP {self.size}")
        per = n // self.size
        pieces = [t[p * n + self.rank * per : p * n + (self.rank + 1) * per] for p in range(parts)]
        return torch.cat(pieces).contiguous()

    def cols(self, t: torch.Tensor, index: list[int] | None = None) -> torch.Tensor:
        """Column slice (input features) of a row-parallel weight, in `partial_dtype`."""
        if index is not None:
            if index == list(range(t.shape[1])):
                return t.to(self.partial_dtype)
            return t[:, torch.tensor(index, device=t.device)].to(self.partial_dtype).contiguous()
        n = t.shape[1]
        if n % self.size:
            raise WeightError(f"{n} input features cannot be split over TP {self.size}")
        per = n // self.size
        return t[:, self.rank * per : (self.rank + 1) * per].to(self.partial_dtype).contiguous()


def fused_for(device: str) -> bool:
    """Whether the layers' elementwise glue runs as fused Triton kernels (kernels.fused):
    PD_RUNTIME_FUSED (1, the default, or 0: the torch ops) where Triton runs (CUDA); the CPU
    always takes the torch ops (the reference)."""
    from ..kernels.segcopy import triton_available

    return env_choice("PD_RUNTIME_FUSED", ("0", "1"), "1") == "1" and triton_available(device)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig, dim: int) -> torch.Tensor:
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    sc = dict(cfg.rope_scaling)
    if sc.get("rope_type", sc.get("type")) != "llama3":
        return inv
    factor, low, high = (
        float(sc["factor"]),
        float(sc["low_freq_factor"]),
        float(sc["high_freq_factor"]),
    )
    old = float(sc["original_max_position_embeddings"])
    low_wl, high_wl = old / low, old / high
    wl = 2 * math.pi / inv
    scaled = torch.where(wl > low_wl, inv / factor, inv)
    smooth = (old / wl - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wl >= high_wl) & (wl <= low_wl)
    return torch.where(medium, smoothed, scaled)


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool
) -> torch.Tensor:
    """x [T, H, d]; cos/sin [T, d/2]. HF rotate_half halves, or adjacent pairs (DeepSeek)."""
    c, s = cos[:, None, :], sin[:, None, :]
    if interleaved:
        xf = x.float().reshape(*x.shape[:-1], -1, 2)
        a, b = xf[..., 0], xf[..., 1]
        return (
            torch.stack((a * c.float() - b * s.float(), a * s.float() + b * c.float()), -1)
            .flatten(-2)
            .to(x.dtype)
        )
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttnMeta,
    scale: float | None = None,
    one: bool = False,
) -> torch.Tensor:
    """q [B, Lq, Hq, d], k/v [B, Lk, Hkv, d] -> [T, Hq * dv] in flat token order (`one`: B is 1
    and Lq is T, the flat order itself: no gather)."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = qt.shape[1] != kt.shape[1]
    if meta.mask is None:
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        o = F.scaled_dot_product_attention(
            qt, kt, vt, attn_mask=meta.mask, scale=scale, enable_gqa=gqa
        )
    b, h, lq, dv = o.shape
    o = o.transpose(1, 2).reshape(b * lq, h * dv)
    return o if one else o[meta.out_index]


class Layer:
    """One decoder layer's weights for this rank and its forward pass."""

    def __init__(self, model: Model, i: int):
        self.m, self.i = model, i
        cfg, s = model.cfg, model.sharder
        p = f"model.layers.{i}."
        self.in_norm = s.full(p + "input_layernorm.weight")
        post = "post_attention_layernorm.weight"
        self.post_norm = s.full(p + (post if s.has(p + post) else "pre_ff_layernorm.weight"))
        self.mixer: Mamba2Mixer | None = None
        if cfg.is_ssm_layer(i):
            self.mixer = Mamba2Mixer(model, p + "mamba.")
        elif cfg.family == "mla":
            self._init_mla(p)
        else:
            self._init_gqa(p)
        if i in cfg.moe_layers:
            self._init_moe(p)
        else:
            self.mlp = dense_mlp(
                s, p + ("mlp." if s.has(p + "mlp.down_proj.weight") else "feed_forward.")
            )

    # --- attention (GQA) ---
    def _init_gqa(self, p: str) -> None:
        cfg, s, m = self.m.cfg, self.m.sharder, self.m
        d = cfg.head_size
        q_rows = [h * d + j for h in m.q_heads for j in range(d)]
        kv_rows = [h * d + j for h in m.kv_heads for j in range(d)]
        a = p + "self_attn."
        # q, k and v in one matmul (one pass over x; the split sizes are this rank's heads)
        self.wqkv = torch.cat(
            (
                s.rows(s.full(a + "q_proj.weight"), q_rows),
                s.rows(s.full(a + "k_proj.weight"), kv_rows),
                s.rows(s.full(a + "v_proj.weight"), kv_rows),
            )
        )
        self.qkv_split = [len(q_rows), len(kv_rows), len(kv_rows)]
        biases = [s.opt(a + n + "_proj.bias") for n in "qkv"]
        self.bqkv = None
        if any(b is not None for b in biases):
            self.bqkv = torch.cat(
                [
                    b[r] if b is not None else self.wqkv.new_zeros(len(r))
                    for b, r in zip(biases, (q_rows, kv_rows, kv_rows), strict=True)
                ]
            )
        self.wo = s.cols(s.full(a + "o_proj.weight"), q_rows)
        self.bo = s.opt(a + "o_proj.bias")
        self.q_norm = s.opt(a + "q_norm.weight")
        self.k_norm = s.opt(a + "k_norm.weight")

    def _attn_gqa(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttnMeta,
        cache: LayerCache,
    ) -> torch.Tensor:
        cfg, m = self.m.cfg, self.m
        d, t = cfg.head_size, x.shape[0]
        qkv = F.linear(x, self.wqkv, self.bqkv)
        if m.fused:
            return self._attn_gqa_fused(qkv, cos, sin, meta, cache)
        qf, kf, vf = qkv.split(self.qkv_split, -1)
        q = qf.reshape(t, len(m.q_heads), d)
        k, v = kf.reshape(t, len(m.kv_heads), d), vf.reshape(t, len(m.kv_heads), d)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = (
                rms_norm(q, self.q_norm, cfg.rms_norm_eps),
                rms_norm(k, self.k_norm, cfg.rms_norm_eps),
            )
        rd = cos.shape[-1] * 2
        if rd == d:
            q, k = apply_rope(q, cos, sin, False), apply_rope(k, cos, sin, False)
        else:  # partial rotary: the first rd dims rotate, the rest pass through
            q = torch.cat((apply_rope(q[..., :rd], cos, sin, False), q[..., rd:]), -1)
            k = torch.cat((apply_rope(k[..., :rd], cos, sin, False), k[..., rd:]), -1)
        rows = torch.cat((k, v), -1)
        if meta.paged is not None:
            o = self._attend_split(q, rows, meta, cache)
            return self.m.row_parallel(o, self.wo, self.bo)
        kv_all = self._cache_rows(rows, meta, cache)
        qp = q[meta.q_index]
        o = attend(qp, kv_all[..., :d], kv_all[..., d:], meta)
        return self.m.row_parallel(o, self.wo, self.bo)

    def _attn_gqa_fused(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttnMeta,
        cache: LayerCache,
    ) -> torch.Tensor:
        """_attn_gqa through kernels.fused: rope on q and k in place in the projection's output,
        K/V written to the cache straight from it, and a single sequence without cached keys
        (a whole prompt) attended without the padded gathers (its padded order is the flat one).
        """
        from ..kernels.fused import kv_write, rope_

        cfg, m = self.m.cfg, self.m
        d, t = cfg.head_size, qkv.shape[0]
        hq, hkv = len(m.q_heads), len(m.kv_heads)
        heads = qkv.view(t, hq + 2 * hkv, d)
        q, k, v = heads[:, :hq], heads[:, hq : hq + hkv], heads[:, hq + hkv :]
        if self.q_norm is not None and self.k_norm is not None:
            q, k = (
                rms_norm(q, self.q_norm, cfg.rms_norm_eps),
                rms_norm(k, self.k_norm, cfg.rms_norm_eps),
            )
            rope_(q, cos, sin, False)
            rope_(k, cos, sin, False)
        else:
            rope_(heads[:, : hq + hkv], cos, sin, False)  # q and k: one launch
        direct = cache.scale is None and cache.data.dtype == k.dtype
        if direct:  # round_trip is the identity: attention may read k / v themselves
            kv_write(k, v, cache.data, meta.write_sel, meta.write_blk, meta.write_off)
        if meta.paged is not None:
            rows = None if direct and meta.sdpa_rows is None else torch.cat((k, v), -1)
            o = self._attend_split(q, rows, meta, cache, written=direct)
            return self.m.row_parallel(o, self.wo, self.bo)
        if direct and meta.q_index.shape[0] == 1 and meta.cache_blk.shape[1] == 0:
            o = attend(q[None], k[None], v[None], meta, one=True)
            return self.m.row_parallel(o, self.wo, self.bo)
        rows = torch.cat((k, v), -1)
        if direct:
            kv_all = rows[meta.q_index]
            if meta.cache_blk.shape[1]:
                cached = cache.get(meta.cache_blk, meta.cache_off, rows.dtype)
                kv_all = torch.cat((cached, kv_all), 1)
        else:
            kv_all = self._cache_rows(rows, meta, cache)
        o = attend(q[meta.q_index], kv_all[..., :d], kv_all[..., d:], meta)
        return self.m.row_parallel(o, self.wo, self.bo)

    def _attend_split(
        self,
        q: torch.Tensor,
        rows: torch.Tensor | None,
        meta: AttnMeta,
        cache: LayerCache,
        written: bool = False,
    ) -> torch.Tensor:
        """A step's decode tokens through the paged kernel, its other chunks through SDPA (each
        padded only to the longest of those chunks). Every row is stored first (`written`: the
        caller has): the kernel reads the decode tokens' own keys from the cache. `rows` may be
        None when the step has no other chunks."""
        from ..kernels.paged_decode import paged_decode

        p, d = meta.paged, self.m.cfg.head_size
        assert p is not None
        if not written:
            assert rows is not None
            cache.put(meta.write_blk, meta.write_off, rows[meta.write_sel])
        qd = q if p.rows is None else q[p.rows]
        od = paged_decode(
            qd.contiguous(),
            cache.data[..., :d],
            cache.data[..., d:],
            p.table,
            p.seq_lens,
            scale=d**-0.5,
            window=p.window,
            num_splits=p.num_splits,
            tokens_per_split=p.tokens_per_split,
        )
        if meta.sdpa_rows is None:
            return od
        o = od.new_empty((q.shape[0], od.shape[1]))
        o[p.rows] = od
        assert rows is not None
        rs = rows[meta.sdpa_rows]
        kv = cache.round_trip(rs)[meta.q_index]
        if meta.cache_blk.shape[1]:
            kv = torch.cat((cache.get(meta.cache_blk, meta.cache_off, rs.dtype), kv), 1)
        o[meta.sdpa_rows] = attend(q[meta.sdpa_rows][meta.q_index], kv[..., :d], kv[..., d:], meta)
        return o

    def _cache_rows(self, rows: torch.Tensor, meta: AttnMeta, cache: LayerCache) -> torch.Tensor:
        """Store this step's rows; return cached + fresh rows per sequence [B, Lc + Lq, H, C]."""
        cache.put(meta.write_blk, meta.write_off, rows[meta.write_sel])
        fresh = cache.round_trip(rows)[meta.q_index]
        if meta.cache_blk.shape[1] == 0:
            return fresh
        cached = cache.get(meta.cache_blk, meta.cache_off, rows.dtype)
        return torch.cat((cached, fresh), 1)

    # --- attention (MLA, DeepSeek-V2) ---
    def _init_mla(self, p: str) -> None:
        cfg, s, m = self.m.cfg, self.m.sharder, self.m
        a = p + "self_attn."
        qd = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        q_rows = [h * qd + j for h in m.q_heads for j in range(qd)]
        if cfg.q_lora_rank:
            self.wq_a = s.full(a + "q_a_proj.weight")
            self.bq_a = s.opt(a + "q_a_proj.bias")
            self.q_a_norm = s.full(a + "q_a_layernorm.weight")
            self.wq = s.rows(s.full(a + "q_b_proj.weight"), q_rows)
        else:
            self.wq = s.rows(s.full(a + "q_proj.weight"), q_rows)
        self.wkv_a = s.full(a + "kv_a_proj_with_mqa.weight")
        self.bkv_a = s.opt(a + "kv_a_proj_with_mqa.bias")
        self.kv_a_norm = s.full(a + "kv_a_layernorm.weight")
        kvd = cfg.qk_nope_head_dim + cfg.v_head_dim
        self.wkv_b = s.rows(
            s.full(a + "kv_b_proj.weight"), [h * kvd + j for h in m.q_heads for j in range(kvd)]
        )
        o_cols = [h * cfg.v_head_dim + j for h in m.q_heads for j in range(cfg.v_head_dim)]
        self.wo = s.cols(s.full(a + "o_proj.weight"), o_cols)
        self.bo = s.opt(a + "o_proj.bias")

    def _attn_mla(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttnMeta,
        cache: LayerCache,
    ) -> torch.Tensor:
        cfg, t, h = self.m.cfg, x.shape[0], len(self.m.q_heads)
        nope, rd, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
        norm = self.m.norm_fn
        if cfg.q_lora_rank:
            qa = norm(F.linear(x, self.wq_a, self.bq_a), self.q_a_norm, cfg.rms_norm_eps)
            q = F.linear(qa, self.wq)
        else:
            q = F.linear(x, self.wq)
        q = q.view(t, h, nope + rd)
        ckv = F.linear(x, self.wkv_a, self.bkv_a)
        c = norm(ckv[:, :r], self.kv_a_norm, cfg.rms_norm_eps)
        if self.m.fused:  # in place, in the projections' outputs
            from ..kernels.fused import rope_

            rope_(q[..., nope:], cos, sin, True)
            k_pe = ckv[:, None, r:]
            rope_(k_pe, cos, sin, True)
        else:
            q = torch.cat((q[..., :nope], apply_rope(q[..., nope:], cos, sin, True)), -1)
            k_pe = apply_rope(ckv[:, None, r:], cos, sin, True)
        rows = torch.cat((c[:, None, :], k_pe), -1)
        if meta.paged is not None:
            return self.m.row_parallel(self._mla_split(q, rows, meta, cache), self.wo, self.bo)
        lat = self._cache_rows(rows, meta, cache)  # [B, Lk, 1, r+rd]
        return self.m.row_parallel(self._mla_sdpa(q[meta.q_index], lat, meta), self.wo, self.bo)

    def _mla_sdpa(self, qp: torch.Tensor, lat: torch.Tensor, meta: AttnMeta) -> torch.Tensor:
        """Latent rows expanded to per-head keys / values, then SDPA (prefill, legacy decode)."""
        cfg, h = self.m.cfg, len(self.m.q_heads)
        nope, rd, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
        kv = F.linear(lat[:, :, 0, :r], self.wkv_b).view(*lat.shape[:2], h, nope + cfg.v_head_dim)
        k = torch.cat((kv[..., :nope], lat[:, :, :, r:].expand(-1, -1, h, -1)), -1)
        return attend(qp, k, kv[..., nope:], meta, scale=(nope + rd) ** -0.5)

    def _mla_split(
        self, q: torch.Tensor, rows: torch.Tensor, meta: AttnMeta, cache: LayerCache
    ) -> torch.Tensor:
        """Decode tokens attend in the latent space (W_UK absorbed into the query, W_UV applied
        to the latent output: kernels.mla_paged_decode reads one cache row per key for every
        head); the step's other chunks as in the legacy path. Rows are stored first."""
        from ..kernels.paged_decode import mla_paged_decode

        cfg, h = self.m.cfg, len(self.m.q_heads)
        nope, rd, r, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank, cfg.v_head_dim
        p = meta.paged
        assert p is not None
        cache.put(meta.write_blk, meta.write_off, rows[meta.write_sel])
        qd = q if p.rows is None else q[p.rows]
        w = self.wkv_b.view(h, nope + dv, r)
        q_lat = torch.einsum("thn,hnr->thr", qd[..., :nope], w[:, :nope])
        o_lat = mla_paged_decode(
            q_lat.contiguous(),
            qd[..., nope:].contiguous(),
            cache.data[:, :, 0],
            p.table,
            p.seq_lens,
            scale=(nope + rd) ** -0.5,
            num_splits=p.num_splits,
            tokens_per_split=p.tokens_per_split,
        )
        od = torch.einsum("thr,hvr->thv", o_lat, w[:, nope:]).reshape(qd.shape[0], h * dv)
        if meta.sdpa_rows is None:
            return od
        o = od.new_empty((q.shape[0], od.shape[1]))
        o[p.rows] = od
        rs = rows[meta.sdpa_rows]
        lat = cache.round_trip(rs)[meta.q_index]
        if meta.cache_blk.shape[1]:
            lat = torch.cat((cache.get(meta.cache_blk, meta.cache_off, rs.dtype), lat), 1)
        o[meta.sdpa_rows] = self._mla_sdpa(q[meta.sdpa_rows][meta.q_index], lat, meta)
        return o

    # --- MLP / MoE ---
    def _init_moe(self, p: str) -> None:
        cfg, s = self.m.cfg, self.m.sharder
        mp = p + ("block_sparse_moe." if s.has(p + "block_sparse_moe.gate.weight") else "mlp.")
        self.router = s.full(mp + "gate.weight")
        gate_up, down = expert_weights(s, mp, cfg.num_experts)
        self.experts_gate_up = torch.stack([s.rows(w, parts=2) for w in gate_up])  # [E, 2I/tp, H]
        self.experts_down = torch.stack([s.cols(w) for w in down])  # [E, H, I/tp]
        self.shared: Mlp | None = None
        self.shared_gate = None
        sp = mp + ("shared_expert." if cfg.shared_expert_gated else "shared_experts.")
        if cfg.shared_expert_intermediate_size and s.has(sp + "down_proj.weight"):
            self.shared = dense_mlp(s, sp)
            self.shared_gate = s.opt(mp + "shared_expert_gate.weight")
        self.mlp = self._moe

    def _moe(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        cfg = self.m.cfg
        if cfg.model_type == "deepseek_v2":
            logits = F.linear(x.float(), self.router.float())
        else:
            logits = F.linear(x, self.router)
        probs = torch.softmax(logits.float(), -1)
        topw, topi = torch.topk(probs, cfg.num_experts_per_tok, -1)
        if cfg.norm_topk_prob:
            topw = topw / topw.sum(-1, keepdim=True)
        topw = (topw * cfg.routed_scaling_factor).to(x.dtype)
        out = torch.zeros(x.shape, dtype=self.experts_down.dtype, device=x.device)
        for e in torch.unique(topi).tolist():
            tok, slot = torch.where(topi == e)
            gate, up = F.linear(x[tok], self.experts_gate_up[e]).chunk(2, -1)
            act = (F.silu(gate) * up).to(out.dtype)
            y = F.linear(act, self.experts_down[e]) * topw[tok, slot, None].to(out.dtype)
            out.index_add_(0, tok, y)
        if self.shared is not None:
            sh = self.shared(x, fused)
            if self.shared_gate is not None:
                sh = torch.sigmoid(F.linear(x, self.shared_gate)) * sh
            out = out + sh.to(out.dtype)
        return out

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttnMeta | list[StateChunk],
        kv: KVCache,
    ) -> torch.Tensor:
        h = rms_norm(x, self.in_norm, self.m.cfg.rms_norm_eps)
        if self.mixer is not None:
            assert isinstance(meta, list)
            x = x + self.mixer.forward(h, meta, kv.states[self.i])
        else:
            assert isinstance(meta, AttnMeta)
            attn = self._attn_mla if self.m.cfg.family == "mla" else self._attn_gqa
            x = x + attn(h, cos, sin, meta, kv.layers[self.i])
        h = rms_norm(x, self.post_norm, self.m.cfg.rms_norm_eps)
        return x + self.m.all_reduce(self.mlp(h, False)).to(x.dtype)

    def forward_fused(
        self,
        x: torch.Tensor,
        delta: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttnMeta | list[StateChunk],
        kv: KVCache,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` with each residual add fused into the RMSNorm that reads it: x + delta is
        the layer's input (delta: the previous layer's MLP output, None before the first);
        x is updated in place; returns (x, this layer's MLP output), whose sum is forward's."""
        from ..kernels.fused import add_rms_norm

        eps = self.m.cfg.rms_norm_eps
        h = add_rms_norm(x, delta, self.in_norm, eps)
        if self.mixer is not None:
            assert isinstance(meta, list)
            a = self.mixer.forward(h, meta, kv.states[self.i])
        else:
            assert isinstance(meta, AttnMeta)
            attn = self._attn_mla if self.m.cfg.family == "mla" else self._attn_gqa
            a = attn(h, cos, sin, meta, kv.layers[self.i])
        h = add_rms_norm(x, a.to(x.dtype), self.post_norm, eps)
        return x, self.m.all_reduce(self.mlp(h, True)).to(x.dtype)


def expert_weights(s: Sharder, mp: str, n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per expert: gate_up [2I, H] (gate rows then up rows) and down [H, I], from either the
    per-expert layout (Mixtral w1/w3/w2, Qwen/DeepSeek gate/up/down_proj) or the fused one."""
    if s.has(mp + "experts.gate_up_proj"):
        gu, dn = s.full(mp + "experts.gate_up_proj"), s.full(mp + "experts.down_proj")
        return list(gu.unbind(0)), list(dn.unbind(0))
    names = (
        ("w1", "w3", "w2")
        if s.has(mp + "experts.0.w1.weight")
        else ("gate_proj", "up_proj", "down_proj")
    )
    gate_up, down = [], []
    for e in range(n):
        ep = f"{mp}experts.{e}."
        gate_up.append(
            torch.cat((s.full(ep + names[0] + ".weight"), s.full(ep + names[1] + ".weight")))
        )
        down.append(s.full(ep + names[2] + ".weight"))
    return gate_up, down


Mlp = Callable[[torch.Tensor, bool], torch.Tensor]  # (x, fused) -> output (a partial sum)


def dense_mlp(s: Sharder, p: str) -> Mlp:
    """SwiGLU MLP, column-parallel gate/up and row-parallel down (partial sum; caller reduces).
    fused: silu(gate) * up in one kernel (kernels.fused.silu_mul)."""
    gate_up = s.rows(
        torch.cat((s.full(p + "gate_proj.weight"), s.full(p + "up_proj.weight"))), parts=2
    )
    down = s.cols(s.full(p + "down_proj.weight"))

    def mlp(x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        if fused:
            from ..kernels.fused import silu_mul

            return F.linear(silu_mul(F.linear(x, gate_up)).to(down.dtype), down)
        g, u = F.linear(x, gate_up).chunk(2, -1)
        return F.linear((F.silu(g) * u).to(down.dtype), down)

    return mlp


class Model:
    """Embedding, layers, final norm and LM head of one TP rank."""

    def __init__(
        self,
        cfg: ModelConfig,
        weights: dict[str, torch.Tensor],
        device: str,
        tp_rank: int = 0,
        tp_size: int = 1,
        group: ProcessGroup | None = None,
    ):
        self.cfg, self.tp_rank, self.tp_size, self.group = cfg, tp_rank, tp_size, group
        self.sharder = Sharder(weights, tp_rank, tp_size, cfg.torch_dtype, device)
        if cfg.num_heads % tp_size:
            raise WeightError(f"{cfg.num_heads} attention heads cannot be split over TP {tp_size}")
        per = cfg.num_heads // tp_size
        self.q_heads = list(range(tp_rank * per, (tp_rank + 1) * per))
        if cfg.family == "mla":
            self.kv_heads: list[int] = []
        else:
            self.kv_heads = kvcache.heads_of_rank(cfg.num_kv_heads, True, tp_size, tp_rank)
            group_size = cfg.num_heads // cfg.num_kv_heads
            if any(h // group_size not in self.kv_heads for h in self.q_heads):
                raise WeightError(
                    f"TP {tp_size}: rank {tp_rank}'s query heads need KV heads it does not hold"
                )
        s = self.sharder
        self.embed = s.full("model.embed_tokens.weight")
        self.norm = s.full(
            "model.norm.weight" if s.has("model.norm.weight") else "model.final_layernorm.weight"
        )
        head = (
            "model.embed_tokens.weight"
            if cfg.tie_word_embeddings or not s.has("lm_head.weight")
            else "lm_head.weight"
        )
        self.lm_head = self.embed if head == "model.embed_tokens.weight" else s.full(head)
        rd = cfg.rope_dim
        self.inv_freq = rope_inv_freq(cfg, rd).to(device)
        # the layers' elementwise glue as fused kernels (CUDA); may be switched per call
        self.fused = fused_for(device)
        self.layers = [Layer(self, i) for i in range(cfg.num_layers)]

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size > 1:
            import torch.distributed as dist

            dist.all_reduce(x, group=self.group)
        return x

    def row_parallel(
        self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None
    ) -> torch.Tensor:
        y = self.all_reduce(F.linear(x.to(w.dtype), w)).to(x.dtype)
        return y + b if b is not None else y

    def forward(
        self,
        ids: torch.Tensor,
        pos: torch.Tensor,
        metas: list[AttnMeta | list[StateChunk]],
        kv: KVCache,
    ) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm; `metas[i]` serves layer i."""
        x = self.embed[ids]
        freqs = pos.float()[:, None] * self.inv_freq[None, :]
        cos, sin = freqs.cos().to(x.dtype), freqs.sin().to(x.dtype)
        if self.fused:
            from ..kernels.fused import add_rms_norm

            delta: torch.Tensor | None = None
            for layer, meta in zip(self.layers, metas, strict=True):
                x, delta = layer.forward_fused(x, delta, cos, sin, meta, kv)
            return add_rms_norm(x, delta, self.norm, self.cfg.rms_norm_eps)
        for layer, meta in zip(self.layers, metas, strict=True):
            x = layer.forward(x, cos, sin, meta, kv)
        return rms_norm(x, self.norm, self.cfg.rms_norm_eps)

    def norm_fn(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        """rms_norm of [T, N] rows, by kernels.fused where the model runs fused."""
        if self.fused and x.stride(-1) == 1:
            from ..kernels.fused import add_rms_norm

            return add_rms_norm(x, None, w, eps)
        return rms_norm(x, w, eps)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.lm_head).float()
