"""Which scaled_dot_product_attention kernel serves the engine's attention shapes, and at what
cost (one GPU, bf16, Llama-3-8B heads: 32 query heads, 8 KV heads, head size 128).

The engine (engine/model.py `attend`) calls SDPA with `enable_gqa` and, whenever a step is not a
single cache-less causal sequence (a prefill chunk after the first, several sequences, decode),
a boolean mask. This times, per shape, the call as the engine makes it against the same
attention with the KV heads expanded (so the memory-efficient kernel may take the mask) and
against each backend forced alone (an error means the backend refuses the call).

    python bench/e2e/sdpa_probe.py [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HQ, HKV, D = 32, 8, 128


def _time(fn: Any, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def _mask(b: int, lq: int, lc: int) -> torch.Tensor:
    """The runner's mask for b sequences of lq new tokens after lc cached ones (causal)."""
    q = lc + torch.arange(lq, device="cuda")[:, None]
    k = torch.arange(lc + lq, device="cuda")[None, :]
    return (k <= q)[None, None].expand(b, 1, lq, lc + lq).contiguous()


def probe(name: str, b: int, lq: int, lc: int) -> dict[str, Any]:
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, HQ, lq, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(b, HKV, lc + lq, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(b, HKV, lc + lq, D, device="cuda", dtype=torch.bfloat16, generator=g)
    m = _mask(b, lq, lc) if (lc or b > 1) else None
    row: dict[str, Any] = {"shape": name, "batch": b, "new_tokens": lq, "cached": lc}

    def engine_call() -> torch.Tensor:
        if m is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)

    def expanded() -> torch.Tensor:
        ke, ve = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
        if m is None:
            return F.scaled_dot_product_attention(q, ke, ve, is_causal=True)
        return F.scaled_dot_product_attention(q, ke, ve, attn_mask=m)

    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    for label, fn in (("engine_call", engine_call), ("kv_expanded", expanded)):
        try:
            row[label + "_ms"] = round(_time(fn), 3)
            row[label + "_peak_extra_gib"] = round(
                (torch.cuda.max_memory_allocated() - base) / 2**30, 2)
        except Exception as e:  # noqa: BLE001 - recorded
            row[label + "_ms"] = f"{type(e).__name__}: {str(e)[:120]}"
        torch.cuda.reset_peak_memory_stats()
    for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
               SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
        try:
            with sdpa_kernel([be]):
                row[f"only_{be.name.lower()}_ms"] = round(_time(engine_call, 3), 3)
        except Exception as e:  # noqa: BLE001 - the backend refuses this call
            row[f"only_{be.name.lower()}_ms"] = f"refused: {str(e).splitlines()[0][:100]}"
    # causal attention FLOPs over the positions actually attended (for a rate)
    pairs = b * (lq * lc + lq * (lq + 1) / 2)
    row["tflop"] = round(4 * pairs * HQ * D / 1e12, 4)
    return row


def growing(b: int, lc: int, steps: int = 12) -> dict[str, Any]:
    """Decode as serving does it: the key length grows by one each step (a new shape for every
    call), against the same shape repeated; per-call wall times, engine-style call."""
    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(b, HQ, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    kv = torch.randn(b, HKV, lc + steps + 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    out: dict[str, Any] = {"batch": b, "context": lc}
    for label, lens in (("growing", [lc + i for i in range(steps)]), ("fixed", [lc] * steps)):
        ts = []
        for n in lens:
            m = torch.ones(b, 1, 1, n, dtype=torch.bool, device="cuda")
            k = kv[:, :, :n]
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            F.scaled_dot_product_attention(q, k, k, attn_mask=m, enable_gqa=True)
            torch.cuda.synchronize()
            ts.append(round((time.perf_counter() - t0) * 1e3, 3))
        out[label + "_ms"] = ts
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    shapes = [("prefill 8k, no cache", 1, 8192, 0), ("chunk 8k after 8k", 1, 8192, 8192),
              ("chunk 8k after 24k", 1, 8192, 24576), ("8 x 1k prefill (batched)", 8, 1024, 0),
              ("decode 8 x 8k", 8, 1, 8192), ("decode 1 x 32k", 1, 1, 32768)]
    rows = []
    for s in shapes:
        r = probe(*s)
        rows.append(r)
        print(json.dumps(r), flush=True)
        torch.cuda.empty_cache()
    grow = [growing(1, 8192), growing(8, 1024), growing(1, 1000)]
    for r in grow:
        print(json.dumps(r), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"torch": torch.__version__, "rows": rows, "growing": grow}, f,
                      separators=(",", ":"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
