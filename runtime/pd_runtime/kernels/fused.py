"""Fused elementwise glue of the engine's layers: residual add + RMSNorm, rope in place, the K/V
cache write, SwiGLU's silu * up.

In eager PyTorch each of these is several full passes over the activations (an 8k-token prefill
of an 8B model: RMSNorm through float32 and back is seven, rope on q and k about eight, the K/V
concatenation, row selection and cache scatter three), about 10% of the pass on an H200
(docs/performance.md). Here each is one pass: one read and one write of every element.

The arithmetic follows engine/model.py's torch ops step by step (the same roundings to the
activation dtype in the same places), so the results match them to the last bit except for
float32 reduction order and the hardware's rsqrt / exp; the tests compare within bf16 rounding.
Every launch depends only on tensor shapes (no host sync, no data-dependent allocation), so the
kernels can be captured in the decode step's CUDA graph.

CUDA only (Triton); the CPU tests run them under TRITON_INTERPRET=1 against the torch ops.
"""

from __future__ import annotations

import torch

from .segcopy import _HAVE_TRITON

if _HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _add_rms_norm(x, r, w, out, n, sx, sr, so, eps, HAS_R: tl.constexpr,
                      BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        m = cols < n
        xv = tl.load(x + row * sx + cols, mask=m, other=0.0)
        if HAS_R:  # x + r in x's dtype (rounded once, as torch adds), written back: the stream
            rv = tl.load(r + row * sr + cols, mask=m, other=0.0)
            xv = (xv.to(tl.float32) + rv.to(tl.float32)).to(xv.dtype)
            tl.store(x + row * sx + cols, xv, mask=m)
        xf = xv.to(tl.float32)
        ms = tl.sum(xf * xf, 0) / n
        y = (xf * tl.rsqrt(ms + eps)).to(xv.dtype)  # normalised in float32, rounded
        wv = tl.load(w + cols, mask=m, other=0.0)
        tl.store(out + row * so + cols,
                 (wv.to(tl.float32) * y.to(tl.float32)).to(out.dtype.element_ty), mask=m)

    @triton.jit
    def _rope(x, cos, sin, n_heads, st, sh, sc, HALF: tl.constexpr, BHALF: tl.constexpr,
              BH: tl.constexpr, INTERLEAVED: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        heads = tl.program_id(1) * BH + tl.arange(0, BH)
        j = tl.arange(0, BHALF)
        jm = j < HALF
        m = (heads < n_heads)[:, None] & jm[None, :]
        c = tl.load(cos + t * sc + j, mask=jm, other=0.0).to(tl.float32)[None, :]
        s = tl.load(sin + t * sc + j, mask=jm, other=0.0).to(tl.float32)[None, :]
        base = x + t * st + heads[:, None].to(tl.int64) * sh
        if INTERLEAVED:  # adjacent pairs (DeepSeek); apply_rope works in float32, rounds once
            p1 = base + 2 * j[None, :]
            p2 = p1 + 1
        else:  # rotate_half: the first and the second half of the rotated dims
            p1 = base + j[None, :]
            p2 = p1 + HALF
        a = tl.load(p1, mask=m, other=0.0)
        b = tl.load(p2, mask=m, other=0.0)
        dt = a.dtype
        af, bf = a.to(tl.float32), b.to(tl.float32)
        if INTERLEAVED:
            o1 = af * c - bf * s
            o2 = af * s + bf * c
        else:  # the torch ops in x's dtype: each product rounded, then their sum
            o1 = (af * c).to(dt).to(tl.float32) - (bf * s).to(dt).to(tl.float32)
            o2 = (bf * c).to(dt).to(tl.float32) + (af * s).to(dt).to(tl.float32)
        tl.store(p1, o1.to(dt), mask=m)
        tl.store(p2, o2.to(dt), mask=m)

    @triton.jit
    def _kv_write(k, v, cache, sel, blk, off, n_heads, skt, skh, svt, svh, cb, cs, ch,
                  D: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr):
        i = tl.program_id(0).to(tl.int64)
        heads = tl.program_id(1) * BH + tl.arange(0, BH)
        dims = tl.arange(0, BD)
        m = (heads < n_heads)[:, None] & (dims < D)[None, :]
        tok = tl.load(sel + i).to(tl.int64)
        dst = (cache + tl.load(blk + i).to(tl.int64) * cb + tl.load(off + i).to(tl.int64) * cs
               + heads[:, None].to(tl.int64) * ch + dims[None, :])
        kv = tl.load(k + tok * skt + heads[:, None] * skh + dims[None, :], mask=m, other=0.0)
        tl.store(dst, kv.to(cache.dtype.element_ty), mask=m)
        vv = tl.load(v + tok * svt + heads[:, None] * svh + dims[None, :], mask=m, other=0.0)
        tl.store(dst + D, vv.to(cache.dtype.element_ty), mask=m)

    @triton.jit
    def _silu_mul(gu, out, n, sg, so, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < n
        g = tl.load(gu + row * sg + cols, mask=m, other=0.0)
        u = tl.load(gu + row * sg + n + cols, mask=m, other=0.0)
        gf = g.to(tl.float32)
        act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)  # F.silu: float32 inside, rounded
        tl.store(out + row * so + cols,
                 (act.to(tl.float32) * u.to(tl.float32)).to(out.dtype.element_ty), mask=m)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def add_rms_norm(
    x: torch.Tensor, r: torch.Tensor | None, w: torch.Tensor, eps: float
) -> torch.Tensor:
    """RMSNorm of x + r (r None: of x) with weight w: [T, N] rows, last dim contiguous.

    With r, x is updated in place to x + r (the residual stream) -- the fused form of
    `x = x + r; h = rms_norm(x, w, eps)`. Returns h, a new [T, N] tensor in x's dtype."""
    t, n = x.shape
    if x.stride(1) != 1 or (r is not None and (r.shape != x.shape or r.stride(1) != 1)):
        raise ValueError("add_rms_norm needs [T, N] rows with a contiguous last dimension")
    out = torch.empty((t, n), dtype=x.dtype, device=x.device)
    if t == 0:
        return out
    block = _pow2(n)
    _add_rms_norm[(t,)](
        x, x if r is None else r, w, out, n, x.stride(0), 0 if r is None else r.stride(0),
        out.stride(0), eps, HAS_R=r is not None, BLOCK=block,
        num_warps=max(1, min(16, block // 256)),
    )
    return out


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> None:
    """Rotate x [T, H, d] in place (any strides, last dim contiguous): its first rd = 2 *
    cos.shape[-1] dims, as engine.model.apply_rope would; dims past rd are left as they are."""
    t, h, d = x.shape
    half = cos.shape[-1]
    if x.stride(2) != 1 or 2 * half > d or cos.shape != sin.shape or cos.stride(1) != 1:
        raise ValueError("rope_ needs x [T, H, d] (last dim contiguous), cos/sin [T, <= d/2]")
    if t == 0 or h == 0:
        return
    bh = min(16, _pow2(h))
    _rope[(t, triton.cdiv(h, bh))](
        x, cos, sin, h, x.stride(0), x.stride(1), cos.stride(0),
        HALF=half, BHALF=_pow2(half), BH=bh, INTERLEAVED=interleaved, num_warps=4,
        enable_fp_fusion=False,  # no a * c - b * s into one fma: apply_rope rounds each product
    )


def kv_write(
    k: torch.Tensor,
    v: torch.Tensor,
    cache: torch.Tensor,
    sel: torch.Tensor,
    blk: torch.Tensor,
    off: torch.Tensor,
) -> None:
    """cache[blk[i], off[i]] = cat(k[sel[i]], v[sel[i]], -1) for every i: k / v [T, H, D] (any
    strides, last dim contiguous), cache [blocks, block_size, H, 2D] (a view of any strides,
    last dim contiguous) -- LayerCache.put of torch.cat((k, v), -1)[sel] without either copy."""
    t, h, d = k.shape
    if (v.shape != k.shape or cache.shape[2:] != (h, 2 * d) or k.stride(2) != 1
            or v.stride(2) != 1 or cache.stride(3) != 1):
        raise ValueError("kv_write: k / v [T, H, D] and a cache [blocks, bs, H, 2D]")
    w = sel.shape[0]
    if w == 0 or h == 0:
        return
    bh = min(8, _pow2(h))
    _kv_write[(w, triton.cdiv(h, bh))](
        k, v, cache, sel, blk, off, h, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cache.stride(0), cache.stride(1), cache.stride(2),
        D=d, BD=_pow2(d), BH=bh, num_warps=4,
    )


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation: gu [T, 2I] (gate columns, then up; last dim contiguous) ->
    silu(gate) * up [T, I], as `g, u = gu.chunk(2, -1); F.silu(g) * u` in gu's dtype."""
    t, n2 = gu.shape
    if n2 % 2 or gu.stride(1) != 1:
        raise ValueError("silu_mul needs [T, 2I] with a contiguous last dimension")
    n = n2 // 2
    out = torch.empty((t, n), dtype=gu.dtype, device=gu.device)
    if t == 0 or n == 0:
        return out
    block = min(2048, _pow2(n))
    _silu_mul[(t, triton.cdiv(n, block))](
        gu, out, n, gu.stride(0), out.stride(0), BLOCK=block,
        num_warps=max(1, min(8, block // 256)),
    )
    return out
