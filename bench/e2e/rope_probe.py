"""Diagnostic (H200 run 10b): kernels.fused's rope against engine.model.apply_rope, the fraction of
bit-identical elements with Triton's fp fusion (fma contraction) on and off; 2048 tokens x 40
heads x 128, bf16 / float32, rotate-half and interleaved. CUDA only.

    PYTHONPATH=runtime python bench/e2e/rope_probe.py
"""
import torch

from pd_runtime.engine.model import apply_rope
from pd_runtime.kernels import fused

g = torch.Generator().manual_seed(1)
for dt in (torch.bfloat16, torch.float32):
    for inter in (False, True):
        t, h, d = 2048, 40, 128
        pos = torch.arange(t, dtype=torch.float32)
        inv = 1.0 / (500000 ** (torch.arange(0, d, 2).float() / d))
        fr = pos[:, None] * inv[None, :]
        cos, sin = fr.cos().to(dt).cuda(), fr.sin().to(dt).cuda()
        x0 = torch.randn(t, h, d, generator=g).to(dt).cuda()
        want = apply_rope(x0, cos, sin, inter)
        res = {}
        for ff in (True, False):
            x = x0.clone()
            fused._rope[(t, 3)](x, cos, sin, h, x.stride(0), x.stride(1), cos.stride(0),
                                HALF=d // 2, BHALF=d // 2, BH=16, INTERLEAVED=inter,
                                num_warps=4, enable_fp_fusion=ff)
            res[ff] = (x == want).float().mean().item()
        print(dt, "interleaved" if inter else "neox", "equal fraction: fusion on",
              res[True], "off", res[False], flush=True)
