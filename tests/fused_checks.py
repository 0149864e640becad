"""Checks of kernels.fused against the torch ops it replaces, shared by the CPU test (Triton's
interpreter, TRITON_INTERPRET=1, in a child process: the variable must be set before the kernels
are defined) and the GPU test (tests/gpu/test_fused_gpu.py).

    TRITON_INTERPRET=1 python -m tests.fused_checks kernels
    TRITON_INTERPRET=1 python -m tests.fused_checks model DIR FAMILY...
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

PROMPT = [1, 17, 42, 99, 3, 250, 8, 64, 5, 130, 77, 12, 9]
DTYPES = (torch.bfloat16, torch.float32)


def _tol(dt: torch.dtype) -> dict[str, float]:
    # bf16: a value may land one rounding step away (float32 sums in another order, rsqrt/exp
    # of the hardware); float32: a few ulps
    return {"rtol": 1.6e-2, "atol": 1e-2} if dt == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}


def check_add_rms_norm(device: str) -> None:
    from pd_runtime.engine.model import rms_norm
    from pd_runtime.kernels.fused import add_rms_norm

    g = torch.Generator().manual_seed(0)
    for dt in DTYPES:
        for t, n in ((37, 256), (5, 96), (3, 4096)):
            x = (3 * torch.randn(t, n + 8, generator=g)).to(dt).to(device)[:, 4 : 4 + n]
            r = torch.randn(t, n, generator=g).to(dt).to(device)
            w = (1 + 0.1 * torch.randn(n, generator=g)).to(dt).to(device)
            want_x = x + r
            want = rms_norm(want_x, w, 1e-5)
            plain = rms_norm(x, w, 1e-5)
            assert torch.equal(add_rms_norm(x.clone(), None, w, 1e-5).float().cpu(),
                               add_rms_norm(x.clone(), None, w, 1e-5).float().cpu())
            torch.testing.assert_close(add_rms_norm(x, None, w, 1e-5), plain, **_tol(dt))
            before = x.clone()
            h = add_rms_norm(x, r, w, 1e-5)
            assert torch.equal(x, want_x), "x + r in place, rounded as torch adds"
            torch.testing.assert_close(h, want, **_tol(dt))
            assert not torch.equal(before, x)
            if dt == torch.bfloat16:  # the same roundings: (nearly) every element bit-identical
                same = (h == want).float().mean().item()
                assert same > 0.99, same


def check_rope(device: str) -> None:
    from pd_runtime.engine.model import apply_rope
    from pd_runtime.kernels.fused import rope_

    g = torch.Generator().manual_seed(1)
    for dt in DTYPES:
        # (tokens, heads, head size, rotated dims, interleaved)
        for t, h, d, rd, inter in ((9, 6, 32, 32, False), (7, 5, 64, 32, False),
                                   (4, 3, 24, 24, True), (6, 1, 16, 16, True),
                                   (3, 20, 128, 128, False)):
            pos = torch.arange(100, 100 + t, dtype=torch.float32)
            inv = 1.0 / (10000 ** (torch.arange(0, rd, 2).float() / rd))
            fr = pos[:, None] * inv[None, :]
            cos, sin = fr.cos().to(dt).to(device), fr.sin().to(dt).to(device)
            # a projection's output holding q (h heads), then 2 more heads that must stay
            buf = torch.randn(t, (h + 2) * d, generator=g).to(dt).to(device)
            x = buf.view(t, h + 2, d)[:, :h]
            want = apply_rope(x[..., :rd], cos, sin, inter)
            keep = buf.view(t, h + 2, d)[:, h:].clone()
            tail = x[..., rd:].clone()
            rope_(x, cos, sin, inter)
            # the same roundings as apply_rope, bit for bit (the kernel is built without fma
            # contraction: with it, an H200 gave 17-21% of the elements one ulp off)
            assert torch.equal(x[..., :rd], want), (dt, t, h, d, rd, inter)
            assert torch.equal(x[..., rd:], tail), "dims past rd pass through"
            assert torch.equal(buf.view(t, h + 2, d)[:, h:], keep), "other heads untouched"


def check_kv_write(device: str) -> None:
    from pd_runtime.engine.kv import LayerCache
    from pd_runtime.kernels.fused import kv_write

    g = torch.Generator().manual_seed(2)
    for dt in DTYPES:
        for layout in ("HND", "NHD"):
            nb, bs, h, d, t = 12, 4, 3, 16, 10
            shape = (nb, h, bs, 2 * d) if layout == "HND" else (nb, bs, h, 2 * d)
            base = torch.randn(shape, generator=g).to(dt).to(device)
            data = base.permute(0, 2, 1, 3) if layout == "HND" else base
            ref = LayerCache(0, 0, 2, data.clone(), None)
            qkv = torch.randn(t, 9 * d, generator=g).to(dt).to(device)
            k = qkv.view(t, 9, d)[:, 3:6]
            v = qkv.view(t, 9, d)[:, 6:9]
            sel = torch.tensor([0, 2, 3, 5, 9], device=device)
            blk = torch.tensor([7, 0, 11, 7, 2], device=device)
            off = torch.tensor([1, 3, 0, 2, 3], device=device)
            ref.put(blk, off, torch.cat((k, v), -1)[sel])
            kv_write(k, v, data, sel, blk, off)
            assert torch.equal(data, ref.data)
            kv_write(k, v, data, sel[:0], blk[:0], off[:0])  # nothing to write
            assert torch.equal(data, ref.data)


def check_silu_mul(device: str) -> None:
    from pd_runtime.kernels.fused import silu_mul

    g = torch.Generator().manual_seed(3)
    for dt in DTYPES:
        for t, n in ((7, 48), (3, 3000)):
            gu = (2 * torch.randn(t, 2 * n, generator=g)).to(dt).to(device)
            a, b = gu.chunk(2, -1)
            want = F.silu(a) * b
            got = silu_mul(gu)
            torch.testing.assert_close(got, want, **_tol(dt))
            if dt == torch.bfloat16:
                assert (got == want).float().mean().item() > 0.99


def check_kernels(device: str) -> None:
    check_add_rms_norm(device)
    check_rope(device)
    check_kv_write(device)
    check_silu_mul(device)


def forced_logits(ck: object, device: str, fused: bool, tokens: list[int] | None, n: int,
                  chunk: int = 0, cache_dtype: str = "auto") -> tuple[list[int], torch.Tensor]:
    """Greedy decoding of PROMPT (prefill in chunks of `chunk`, 0: one) with the glue fused or
    not; `tokens`: feed these instead of the argmax (teacher-forced). (tokens, float32 logits)."""
    from pd_runtime import kvcache
    from pd_runtime.engine.core import rank_spec_for
    from pd_runtime.engine.kv import KVCache, chunk_block_table
    from pd_runtime.engine.runner import ModelRunner, SeqChunk

    bs = 4
    spec = rank_spec_for(ck.config, block_size=bs, num_blocks=64,  # type: ignore[attr-defined]
                         cache_dtype=cache_dtype)
    runner = ModelRunner(ck, KVCache.allocate(spec, device), device)  # type: ignore[arg-type]
    runner.model.fused = fused
    groups = [g for g in kvcache.groups_of(spec.model) if g != kvcache.GROUP_STATE]
    ids = list(range(64))

    def step(toks: list[int], start: int) -> torch.Tensor:
        tabs = {g: chunk_block_table(spec.model, g, start, start + len(toks), bs, ids)
                for g in groups}
        return runner.execute([SeqChunk(toks, start, tabs, state_slot=0)])[0].float().cpu()

    c = chunk or len(PROMPT)
    for s in range(0, len(PROMPT), c):
        last = step(PROMPT[s : s + c], s)
    out, logits = [], [last]
    for i in range(n):
        out.append(int(logits[-1].argmax()) if tokens is None else tokens[i])
        if i < n - 1:
            logits.append(step([out[-1]], len(PROMPT) + i))
    return out, torch.stack(logits)


def check_model(root: Path, families: list[str], device: str) -> None:
    """Fused against unfused, same weights: float32 greedy tokens equal (logits within 1e-4);
    bfloat16 logits along the unfused tokens within bf16 rounding (one-shot and chunked); for the
    dense family also with an fp8 cache (chunked, so that cached rows are read back), logits
    along the unfused tokens (an fp8 rounding flipped by a last-bit difference moves them)."""
    from pd_runtime.engine.checkpoint import load_checkpoint
    from tests.engine_fixtures import write_family

    for fam in families:
        path = write_family(root / fam, fam)
        ck = load_checkpoint(path)
        ref, a = forced_logits(ck, device, False, None, 6)
        got, b = forced_logits(ck, device, True, None, 6)
        assert got == ref, (fam, got, ref)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        ck16 = load_checkpoint(path, dtype="bfloat16")
        for chunk in (0, 5):
            ref16, a16 = forced_logits(ck16, device, False, None, 6, chunk)
            _, b16 = forced_logits(ck16, device, True, ref16, 6, chunk)
            rel = float(((a16 - b16).norm(dim=-1) / a16.norm(dim=-1)).max())
            assert rel < 2e-2, (fam, chunk, rel)
        if fam == "dense":  # an fp8 cache: quantized rows through the cache, not kv_write
            ref8, a8 = forced_logits(ck, device, False, None, 6, 5, cache_dtype="fp8")
            _, b8 = forced_logits(ck, device, True, ref8, 6, 5, cache_dtype="fp8")
            rel = float(((a8 - b8).norm(dim=-1) / a8.norm(dim=-1)).max())
            assert rel < 2e-2, (fam, "fp8", rel)
            print(f"{fam} fp8 cache: largest relative logit difference {rel:.1e}", flush=True)
        print(f"{fam}: fused == unfused", flush=True)


def interpreter_rounds_to_nearest() -> None:
    """Triton's interpreter truncates float32 -> bfloat16 casts (and its round-to-nearest path
    does not carry into the exponent); compiled kernels round to nearest even. Make the
    interpreter round as the GPU does, so that the CPU run checks the kernels' roundings too."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    orig = interpreter.InterpreterBuilder.create_fp_trunc

    def trunc(self, src, dst_type):  # type: ignore[no-untyped-def]
        if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.bfloat16:
            return orig(self, src, dst_type)
        bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32)
        up = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
        out = (up >> np.uint32(16)).astype(np.uint16)
        out = np.where(np.isnan(src.data), np.uint16(0x7FC0), out)
        return interpreter.TensorHandle(out, tl.bfloat16)

    interpreter.InterpreterBuilder.create_fp_trunc = trunc


if __name__ == "__main__":
    interpreter_rounds_to_nearest()
    if sys.argv[1] == "kernels":
        check_kernels("cpu")
    else:
        check_model(Path(sys.argv[2]), sys.argv[3:], "cpu")
    print("ok")
