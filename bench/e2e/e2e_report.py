"""What bench_e2e.py and prefill_bench.py share about their results: the machine they were
measured on, and the printed tables of prefill_bench's results (the prefill rows and the
torch.profiler tables, prefill_bench._profile's). torch is imported only where it is needed: the
bench_e2e driver imports this module at its start."""

from __future__ import annotations

import os
import platform
import time
from typing import Any


def machine_info(device: str) -> dict[str, Any]:
    """Host, versions (torch, transformers, Triton; CUDA and nvidia-smi's GPU line on "cuda") and
    the PD_RUNTIME_ / UCX_ settings of this process."""
    import torch

    info: dict[str, Any] = {"host": platform.node(), "cpu_count": os.cpu_count(),
                            "python": platform.python_version(), "torch": torch.__version__,
                            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for mod in ("transformers", "triton"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            pass
    if device == "cuda":
        import subprocess

        q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,"
                            "clocks.max.sm", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=30)
        info["gpu"] = q.stdout.strip()
        info["cuda"] = torch.version.cuda
    info["env"] = {k: v for k, v in os.environ.items() if k.startswith("PD_RUNTIME_")}
    info["ucx_env"] = {k: v for k, v in os.environ.items() if k.startswith("UCX_")}
    return info


def print_profile(title: str, prof: dict[str, Any], top: int | None = None) -> None:
    """One profile (prefill_bench._profile): wall and device time, then its `top` first rows."""
    print(f"\nprofile, {title}: wall {prof['wall_ms_profiled']} ms (profiled), device "
          f"{prof['device_ms_total']} ms")
    for row in prof["top"][:top]:
        print(f"  {row['self_device_ms']:9.2f} ms dev {row['self_cpu_ms']:9.2f} ms cpu "
              f"{row['calls']:6}x  {row['name']}")


def print_prefill(pf: dict[str, Any], top: int | None = None) -> None:
    """prefill_bench.prefill_bench's rows: the engine with its fused glue ("new"), with the torch
    ops ("old", only where the new path is fused) and transformers ("HF"), then the profiles."""
    print(f"\nPrefill, one sequence, ModelRunner (new: fused, old: torch ops) vs transformers "
          f"(SDPA), same weights; bf16 matmul ceiling here {pf.get('matmul_tflops')} TFLOP/s; "
          f"MFU vs {pf['peak_tflops_datasheet']} TFLOP/s")
    print(f"{'tokens':>7} | {'old ms':>8} {'MFU':>6} | {'new ms':>8} {'MFU':>6} | {'HF ms':>8} "
          f"{'MFU':>6} | {'new/old':>7} {'old/HF':>6} {'new/HF':>6} | logits rel diff new-old "
          f"new-HF")
    for r in pf["rows"]:
        if "skipped" in r:
            print(f"{r['tokens']:>7} | skipped: {r['skipped']}")
            continue

        def ms(k: str, r: dict[str, Any] = r) -> str:
            return f"{1e3 * r[k + '_median_s']:8.1f} {r[k + '_mfu']:6.1%}" if k + "_mfu" in r \
                else f"{'-':>8} {'-':>6}"

        def ratio(k: str, r: dict[str, Any] = r) -> str:
            return f"{r[k]:.3f}" if k in r else "-"

        def rel(k: str, r: dict[str, Any] = r) -> str:
            return f"{r[k]:.2e}" if k in r else "-"

        print(f"{r['tokens']:>7} | {ms('engine_old')} | {ms('engine')} | {ms('hf')} | "
              f"{ratio('ratio_engine_over_engine_old'):>7} {ratio('ratio_engine_old_over_hf'):>6} "
              f"{ratio('ratio_engine_over_hf'):>6} | {rel('engine_vs_old_logits_rel_l2'):>8} "
              f"{rel('last_logits_rel_l2'):>8}")
    for who, prof in pf.get("profile", {}).items():
        print_profile(who, prof, top)
