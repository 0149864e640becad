"""Paged decode attention: one query token per sequence, keys and values read in place.

The legacy decode path gathers every cached key of a step into a padded [B, Lc] tensor (one
`index` per layer) and hands SDPA a new key length each step: cuDNN then builds a new graph for
every step (50-60 ms on an H200, docs/performance.md). This kernel reads the paged cache through
the block table directly, so its shapes never depend on the context length (and a decode step can
be captured once in a CUDA graph per batch / table-width bucket).

Flash-decoding in two launches: `_partial` gives each (sequence, KV head, split of the context)
one program, which attends the G query heads of its KV head to the split's keys (online softmax,
float32) and writes an unnormalised output with its running max and sum; `_reduce` merges the
splits. Splits cover fixed token ranges [s * tps, (s + 1) * tps), so a graph captured for a table
width serves any context length below it (splits past the sequence's end write nothing useful
and weigh zero).

CUDA only (Triton); `paged_decode_reference` is the same arithmetic in torch (tests, CPU).
"""

from __future__ import annotations

import math
import os

import torch

from .segcopy import _HAVE_TRITON

BLOCK_N = 64  # keys per inner iteration

# programs per launch the split plan aims at: about two waves of an H100/H200's 132 SMs
TARGET_PROGRAMS = int(os.environ.get("PD_RUNTIME_DECODE_PROGRAMS", "264"))

if _HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _partial(q, kc, vc, table, seq_lens, po, pm, pl, scale, window, tps, bs, t_stride,
                 sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, num_splits,
                 HQ: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                 BD: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        s = tl.program_id(2)
        n_keys = tl.load(seq_lens + b).to(tl.int32)
        lo = 0
        if window > 0:
            lo = tl.maximum(n_keys - window, 0)
        start = tl.maximum(s * tps, lo)
        end = tl.minimum((s + 1) * tps, n_keys)
        rows = tl.arange(0, GP)
        dims = tl.arange(0, BD)
        rmask = rows < G
        dmask = dims < D
        qh = h * G + rows
        qv = tl.load(q + b * HQ * D + qh[:, None] * D + dims[None, :],
                     mask=rmask[:, None] & dmask[None, :], other=0.0)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, BD], tl.float32)
        for n0 in range(start, end, BN):
            offs = n0 + tl.arange(0, BN)
            valid = offs < end
            blk = tl.load(table + b * t_stride + offs // bs, mask=valid, other=0).to(tl.int64)
            slot = (offs % bs).to(tl.int64)
            lmask = valid[:, None] & dmask[None, :]
            kv = tl.load(kc + blk[:, None] * sk_b + slot[:, None] * sk_s + h * sk_h
                         + dims[None, :], mask=lmask, other=0.0)
            if IEEE:
                sc = tl.dot(qv, tl.trans(kv), input_precision="ieee")
            else:
                sc = tl.dot(qv, tl.trans(kv))
            sc = tl.where(valid[None, :], sc * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            p = tl.exp(sc - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            vv = tl.load(vc + blk[:, None] * sv_b + slot[:, None] * sv_s + h * sv_h
                         + dims[None, :], mask=lmask, other=0.0)
            if IEEE:
                pv = tl.dot(p.to(vv.dtype), vv, input_precision="ieee")
            else:
                pv = tl.dot(p.to(vv.dtype), vv)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        base = (b * HQ + qh) * num_splits + s
        tl.store(pm + base, m_i, mask=rmask)
        tl.store(pl + base, l_i, mask=rmask)
        tl.store(po + base[:, None] * D + dims[None, :], acc,
                 mask=rmask[:, None] & dmask[None, :])

    @triton.jit
    def _reduce(po, pm, pl, out, num_splits, D: tl.constexpr, BD: tl.constexpr,
                BS_: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # b * HQ + head
        sp = tl.arange(0, BS_)
        smask = sp < num_splits
        dims = tl.arange(0, BD)
        dmask = dims < D
        m = tl.load(pm + row * num_splits + sp, mask=smask, other=float("-inf"))
        lsum = tl.load(pl + row * num_splits + sp, mask=smask, other=0.0)
        mx = tl.max(m, 0)
        w = tl.where(m > float("-inf"), tl.exp(m - mx), 0.0)
        o = tl.load(po + (row * num_splits + sp)[:, None] * D + dims[None, :],
                    mask=smask[:, None] & dmask[None, :], other=0.0)
        num = tl.sum(o * w[:, None], 0)
        den = tl.sum(lsum * w, 0)
        tl.store(out + row * D + dims, (num / den).to(out.dtype.element_ty), mask=dmask)


if _HAVE_TRITON:

    @triton.jit
    def _mla_partial(qc, qp, lat, table, seq_lens, po, pm, pl, scale, tps, bs, t_stride,
                     s_b, s_s, num_splits, H: tl.constexpr, HB: tl.constexpr, R: tl.constexpr,
                     BR: tl.constexpr, RD: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                     IEEE: tl.constexpr):
        # MLA, weights absorbed: keys are latent rows [c (R) | k_pe (RD)], values are c itself;
        # the query is [q_nope W_UK (R) | q_pe (RD)]; one row of `lat` serves every head.
        b = tl.program_id(0).to(tl.int64)
        hb = tl.program_id(1)
        s = tl.program_id(2)
        n_keys = tl.load(seq_lens + b).to(tl.int32)
        start = s * tps
        end = tl.minimum((s + 1) * tps, n_keys)
        heads = hb * HB + tl.arange(0, HB)
        hmask = heads < H
        rd = tl.arange(0, BR)
        rmask = rd < R
        pd = tl.arange(0, BP)
        pmask = pd < RD
        q_c = tl.load(qc + (b * H + heads)[:, None] * R + rd[None, :],
                      mask=hmask[:, None] & rmask[None, :], other=0.0)
        q_p = tl.load(qp + (b * H + heads)[:, None] * RD + pd[None, :],
                      mask=hmask[:, None] & pmask[None, :], other=0.0)
        m_i = tl.full([HB], float("-inf"), tl.float32)
        l_i = tl.zeros([HB], tl.float32)
        acc = tl.zeros([HB, BR], tl.float32)
        for n0 in range(start, end, BN):
            offs = n0 + tl.arange(0, BN)
            valid = offs < end
            blk = tl.load(table + b * t_stride + offs // bs, mask=valid, other=0).to(tl.int64)
            row = lat + blk * s_b + (offs % bs).to(tl.int64) * s_s
            c = tl.load(row[:, None] + rd[None, :], mask=valid[:, None] & rmask[None, :],
                        other=0.0)
            pe = tl.load(row[:, None] + R + pd[None, :], mask=valid[:, None] & pmask[None, :],
                         other=0.0)
            if IEEE:
                sc = tl.dot(q_c, tl.trans(c), input_precision="ieee")
                sc += tl.dot(q_p, tl.trans(pe), input_precision="ieee")
            else:
                sc = tl.dot(q_c, tl.trans(c)) + tl.dot(q_p, tl.trans(pe))
            sc = tl.where(valid[None, :], sc * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            p = tl.exp(sc - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            if IEEE:
                pv = tl.dot(p.to(c.dtype), c, input_precision="ieee")
            else:
                pv = tl.dot(p.to(c.dtype), c)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        base = (b * H + heads) * num_splits + s
        tl.store(pm + base, m_i, mask=hmask)
        tl.store(pl + base, l_i, mask=hmask)
        tl.store(po + base[:, None] * R + rd[None, :], acc, mask=hmask[:, None] & rmask[None, :])


MLA_HEAD_BLOCK = 16


def mla_paged_decode(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    latent: torch.Tensor,
    table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float,
    num_splits: int,
    tokens_per_split: int,
) -> torch.Tensor:
    """MLA decode attention in the latent space: q_lat [B, H, R] (q_nope absorbed through
    W_UK), q_pe [B, H, RD], latent [blocks, block_size, R + RD] cache rows (last dim
    contiguous). Returns the latent output [B, H, R] (softmax-weighted c) in q_lat's dtype;
    the caller applies W_UV."""
    b, h, r = q_lat.shape
    rdim = q_pe.shape[2]
    if latent.stride(2) != 1 or not (q_lat.is_contiguous() and q_pe.is_contiguous()):
        raise ValueError("mla_paged_decode needs contiguous rows")
    s = num_splits
    po = torch.empty((b, h, s, r), dtype=torch.float32, device=q_lat.device)
    pm = torch.empty((b, h, s), dtype=torch.float32, device=q_lat.device)
    pl = torch.empty((b, h, s), dtype=torch.float32, device=q_lat.device)
    out = torch.empty((b, h, r), dtype=q_lat.dtype, device=q_lat.device)
    br = max(16, triton.next_power_of_2(r))
    grid = (b, triton.cdiv(h, MLA_HEAD_BLOCK), s)
    _mla_partial[grid](
        q_lat, q_pe, latent, table, seq_lens, po, pm, pl, scale, tokens_per_split,
        latent.shape[1], table.stride(0), latent.stride(0), latent.stride(1), s,
        H=h, HB=MLA_HEAD_BLOCK, R=r, BR=br, RD=rdim, BP=max(16, triton.next_power_of_2(rdim)),
        BN=32 if br >= 256 else 64, IEEE=q_lat.dtype == torch.float32,
        num_warps=8 if br >= 256 else 4, num_stages=1,
    )
    _reduce[(b * h,)](po, pm, pl, out, s, D=r, BD=br,
                      BS_=max(2, triton.next_power_of_2(s)), num_warps=4)
    return out


def mla_paged_decode_reference(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    latent: torch.Tensor,
    table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float,
) -> torch.Tensor:
    """The same function in plain torch, one sequence at a time (tests)."""
    r, bs = q_lat.shape[2], latent.shape[1]
    outs = []
    for i in range(q_lat.shape[0]):
        pos = torch.arange(int(seq_lens[i]), device=q_lat.device)
        rows = latent[table[i].long()[pos // bs], pos % bs].float()  # [n, R + RD]
        sc = (q_lat[i].float() @ rows[:, :r].T + q_pe[i].float() @ rows[:, r:].T) * scale
        outs.append((torch.softmax(sc, -1) @ rows[:, :r]).to(q_lat.dtype))
    return torch.stack(outs)


def split_plan(batch: int, kv_heads: int, max_keys: int) -> tuple[int, int]:
    """(num_splits, tokens per split) for a step whose longest sequence has `max_keys` keys:
    enough programs to fill the chip, each split a whole number of BLOCK_N tiles."""
    tiles = max(1, math.ceil(max_keys / BLOCK_N))
    want = max(1, math.ceil(TARGET_PROGRAMS / max(1, batch * kv_heads)))
    splits = min(tiles, want)
    tps = math.ceil(tiles / splits) * BLOCK_N
    return math.ceil(max_keys / tps) if max_keys else 1, tps


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float,
    window: int,
    num_splits: int,
    tokens_per_split: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one query token per sequence over its paged keys.

    q [B, Hq, D] contiguous; k_cache / v_cache [blocks, block_size, Hkv, D] views (any strides,
    last dim contiguous); table [B, W] block ids (int32/int64, rows padded with any valid id);
    seq_lens [B] keys per sequence (the current token's included, already written); window > 0:
    only the last `window` keys. Returns [B, Hq * D] in q's dtype.
    """
    b, hq, d = q.shape
    hkv = k_cache.shape[2]
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1 or not q.is_contiguous():
        raise ValueError("paged_decode needs a contiguous last dimension")
    g = hq // hkv
    s = num_splits
    po = torch.empty((b, hq, s, d), dtype=torch.float32, device=q.device)
    pm = torch.empty((b, hq, s), dtype=torch.float32, device=q.device)
    pl = torch.empty((b, hq, s), dtype=torch.float32, device=q.device)
    if out is None:
        out = torch.empty((b, hq * d), dtype=q.dtype, device=q.device)
    bd = max(16, triton.next_power_of_2(d))  # tl.dot needs K >= 16 (masked dims read 0)
    _partial[(b, hkv, s)](
        q, k_cache, v_cache, table, seq_lens, po, pm, pl, scale, window, tokens_per_split,
        k_cache.shape[1], table.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), s,
        HQ=hq, G=g, GP=max(16, triton.next_power_of_2(g)), D=d, BD=bd, BN=BLOCK_N,
        IEEE=q.dtype == torch.float32, num_warps=4, num_stages=2,
    )
    _reduce[(b * hq,)](po, pm, pl, out, s, D=d, BD=bd,
                       BS_=max(2, triton.next_power_of_2(s)), num_warps=4)
    return out


def paged_decode_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float,
    window: int,
) -> torch.Tensor:
    """The same function in plain torch, one sequence at a time (float64-free; tests)."""
    b, hq, d = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    outs = []
    for i in range(b):
        n = int(seq_lens[i])
        lo = max(0, n - window) if window > 0 else 0
        pos = torch.arange(lo, n, device=q.device)
        blk = table[i].long()[pos // bs]
        k = k_cache[blk, pos % bs].float()  # [n, Hkv, D]
        v = v_cache[blk, pos % bs].float()
        k = k.repeat_interleave(hq // hkv, 1)
        v = v.repeat_interleave(hq // hkv, 1)
        sc = torch.einsum("hd,nhd->hn", q[i].float(), k) * scale
        p = torch.softmax(sc, -1)
        outs.append(torch.einsum("hn,nhd->hd", p, v).reshape(-1).to(q.dtype))
    return torch.stack(outs)
