"""Prefill throughput: the engine's ModelRunner against transformers on the same weights.

Runs inside the aggregated worker of bench_e2e.py (it owns the engine and the weights), or alone
(`main`, below). Per prompt length: one causal pass over the whole prompt, the engine's
`ModelRunner.execute` (paged KV writes included, logits at the last token) with its elementwise
glue fused (kernels.fused, PD_RUNTIME_FUSED=1: "engine") and, in the same process, with the torch
ops (`model.fused = False`: "engine_old"), and `LlamaForCausalLM(..., use_cache=True,
logits_to_keep=1)` (SDPA, its KV cache filled), turns alternating, median of `reps` after a
warm-up of each. Also: the last token's logits (relative L2 differences), a bf16 matrix-product
ceiling measured in the same process, and optionally a torch.profiler table of one pass of each.

    python bench/e2e/prefill_bench.py [--lengths 1024,8192,32768] [--reps 5]
        [--profile-len 8192] [--out FILE]
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

H200_BF16_DENSE_TFLOPS = 989.4  # H200 / H100 SXM datasheet, dense bf16 (no sparsity)


def _sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], dev: str) -> tuple[float, Any]:
    _sync(dev)
    t0 = time.perf_counter()
    out = fn()
    _sync(dev)
    return time.perf_counter() - t0, out


def matmul_ceiling(dev: str, n: int = 8192, reps: int = 10) -> float | None:
    """TFLOP/s of an n x n x n bf16 product on random data (the achievable ceiling here)."""
    if dev != "cuda":
        return None
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = [_timed(lambda: a @ b, dev)[0] for _ in range(reps)]
    return round(2 * n**3 / statistics.median(times) / 1e12, 1)


def _profile(fn: Callable[[], Any], dev: str, top: int = 15) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    _sync(dev)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        fn()
        _sync(dev)
    wall = time.perf_counter() - t0  # (profiling overhead included)
    ev = prof.key_averages()

    def dev_us(e: Any) -> float:
        for a in ("self_device_time_total", "self_cuda_time_total"):
            if hasattr(e, a):
                return float(getattr(e, a))
        return 0.0

    rows = sorted(ev, key=dev_us if dev == "cuda" else (lambda e: e.self_cpu_time_total),
                  reverse=True)
    total_dev = sum(dev_us(e) for e in ev)
    return {"wall_ms_profiled": round(wall * 1e3, 2),
            "device_ms_total": round(total_dev / 1e3, 2),
            "top": [{"name": e.key[:90], "calls": e.count,
                     "self_device_ms": round(dev_us(e) / 1e3, 3),
                     "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 3)} for e in rows[:top]]}


def prefill_bench(eng: Any, ckpt: Any, opts: dict[str, Any], req: dict[str, Any]) -> dict[str, Any]:
    from random_model import hf_config, hf_model, prefill_flops

    from pd_runtime import kvcache
    from pd_runtime.engine.runner import SeqChunk

    dev, reps = opts["device"], int(req.get("reps", 3))
    cfg = hf_config(opts["geometry"])
    runner = eng.runner
    bs, nb = eng.spec.block_size, eng.spec.num_blocks
    hf = hf_model(opts["geometry"], ckpt.weights, dev) if req.get("hf", True) else None
    ceiling = matmul_ceiling(dev) if req.get("ceiling", True) else None
    out: dict[str, Any] = {"matmul_tflops": ceiling,
                           "peak_tflops_datasheet": H200_BF16_DENSE_TFLOPS,
                           "peak_note": "MFU against the H200 SXM datasheet dense bf16 rate",
                           "rows": [], "profile": {}}
    fused0 = bool(getattr(runner.model, "fused", False))
    out["fused"] = fused0
    g = torch.Generator().manual_seed(1234)
    for length in req["lengths"]:
        need = kvcache.blocks_needed(length, bs)
        if need > nb:
            out["rows"].append({"tokens": length,
                                "skipped": f"needs {need} blocks, the arena has {nb}"})
            continue
        ids = torch.randint(2, cfg["vocab_size"], (length,), generator=g).tolist()
        chunk = SeqChunk(ids, 0, {kvcache.GROUP_FULL: list(range(need))})
        t_ids = torch.tensor([ids], device=dev)

        def run_engine(chunk: SeqChunk = chunk) -> torch.Tensor:
            return runner.execute([chunk])[0]

        def run_hf(t_ids: torch.Tensor = t_ids, model: Any = hf) -> torch.Tensor:
            with torch.inference_mode():
                out = model(input_ids=t_ids, use_cache=True, logits_to_keep=1)
                return out.logits[0, -1].float()

        # engine variants: (name, model.fused); the old path only where the new one is fused
        variants = [("engine", fused0)]
        if fused0 and req.get("old", True):
            variants.insert(0, ("engine_old", False))

        def turn(fused: bool) -> Callable[[], torch.Tensor]:
            def go() -> torch.Tensor:
                runner.model.fused = fused
                return run_engine()
            return go

        times: dict[str, list[float]] = {name: [] for name, _ in variants}
        last: dict[str, torch.Tensor] = {}
        for name, fused in variants:  # warm-up (and the logits to compare)
            last[name] = _timed(turn(fused), dev)[1]
        lh = _timed(run_hf, dev)[1] if hf is not None else None
        th = []
        for _ in range(reps):
            for name, fused in variants:
                times[name].append(_timed(turn(fused), dev)[0])
            if hf is not None:
                th.append(_timed(run_hf, dev)[0])
        runner.model.fused = fused0
        flops = prefill_flops(cfg, length)
        row: dict[str, Any] = {"tokens": length, "model_tflop": round(flops / 1e12, 2)}
        for name, _ in variants:
            te = times[name]
            me = statistics.median(te)
            row[f"{name}_s"] = [round(t, 5) for t in te]
            row[f"{name}_median_s"] = round(me, 5)
            row[f"{name}_tokens_per_s"] = round(length / me, 1)
            row[f"{name}_tflops"] = round(flops / me / 1e12, 1)
            row[f"{name}_mfu"] = round(flops / me / 1e12 / H200_BF16_DENSE_TFLOPS, 4)
        le = last["engine"]
        if "engine_old" in last:
            lo = last["engine_old"]
            row["ratio_engine_over_engine_old"] = round(row["engine_old_median_s"]
                                                        / row["engine_median_s"], 3)
            row["engine_vs_old_logits_rel_l2"] = float((le - lo).norm() / lo.norm())
            row["engine_vs_old_same_argmax"] = bool(int(le.argmax()) == int(lo.argmax()))
        if hf is not None and lh is not None:
            mh = statistics.median(th)
            row.update({"hf_s": [round(t, 5) for t in th], "hf_median_s": round(mh, 5),
                        "hf_tokens_per_s": round(length / mh, 1),
                        "hf_tflops": round(flops / mh / 1e12, 1),
                        "hf_mfu": round(flops / mh / 1e12 / H200_BF16_DENSE_TFLOPS, 4),
                        "ratio_engine_over_hf": round(mh / row["engine_median_s"], 3),
                        "last_logits_rel_l2": float((le - lh).norm() / lh.norm()),
                        "same_argmax": bool(int(le.argmax()) == int(lh.argmax()))})
            if "engine_old" in last:
                row["ratio_engine_old_over_hf"] = round(mh / row["engine_old_median_s"], 3)
        out["rows"].append(row)
        if req.get("profile_len") == length:
            for name, fused in variants:
                out["profile"][name] = _profile(turn(fused), dev, top=int(req.get("top", 15)))
            runner.model.fused = fused0
            if hf is not None:
                out["profile"]["hf"] = _profile(run_hf, dev, top=int(req.get("top", 15)))
    if req.get("decode"):
        out["decode"] = decode_bench(eng, hf, cfg, dev, req["decode"])
    hf = None  # free its activations' cache before the serving cells go on
    if dev == "cuda":
        torch.cuda.empty_cache()
    return out


BUCKET = 256


@contextlib.contextmanager
def padded_cache_keys(bucket: int) -> Iterator[None]:
    """Bench-side experiment, not the engine's code: pad each step's cached-key length to a
    multiple of `bucket` (the pads masked out), so consecutive decode steps reuse one attention
    shape instead of presenting SDPA with a new one every step."""
    from pd_runtime.engine import runner

    orig = runner.build_meta

    def build_meta(batch: Any, group: int, window: int, bs: int, num_blocks: int,
                   device: str, **kw: Any) -> Any:
        m = orig(batch, group, window, bs, num_blocks, device, **kw)
        lc = m.cache_blk.shape[1]
        pad = -lc % bucket
        if lc == 0 or m.mask is None or pad == 0:
            return m
        b, lq = m.cache_blk.shape[0], m.mask.shape[2]
        z = m.cache_blk.new_zeros((b, pad))
        mask = torch.cat((m.mask[..., :lc], m.mask.new_zeros((b, 1, lq, pad)), m.mask[..., lc:]),
                         -1)
        return dataclasses.replace(m, cache_blk=torch.cat((m.cache_blk, z), 1),
                                   cache_off=torch.cat((m.cache_off, z), 1), mask=mask)

    runner.build_meta = build_meta
    try:
        yield
    finally:
        runner.build_meta = orig


def _hf_cache(hf: Any, cfg: dict[str, Any], batch: int, length: int, dev: str) -> Any:
    """A DynamicCache holding `length` random positions per layer (what a prefill leaves)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=hf.config)
    shape = (batch, cfg["num_key_value_heads"], length, cfg["head_dim"])
    dt = getattr(torch, cfg["dtype"])
    for i in range(cfg["num_hidden_layers"]):
        cache.update(torch.randn(shape, device=dev, dtype=dt),
                     torch.randn(shape, device=dev, dtype=dt), i)
    return cache


def decode_bench(eng: Any, hf: Any, cfg: dict[str, Any], dev: str,
                 req: dict[str, Any]) -> dict[str, Any]:
    """One decode step of B sequences at context L: the ModelRunner (consecutive positions,
    each step's wall time, so a drift shows), a whole LLMEngine step (scheduler, sampling), and
    transformers with a DynamicCache of the same length. KV contents are random (timing only)."""
    from pd_runtime import kvcache
    from pd_runtime.engine.runner import SeqChunk
    from pd_runtime.engine.sampling import SamplingParams

    bs, nb = eng.spec.block_size, eng.spec.num_blocks
    steps = int(req.get("steps", 8))
    rows = []
    for batch, length in req["cases"]:
        need = kvcache.blocks_needed(length + 2 * steps + 2, bs)  # three runs of positions
        if batch * need > nb:
            rows.append({"batch": batch, "context": length, "skipped": "arena too small"})
            continue
        tabs = [{kvcache.GROUP_FULL: list(range(i * need, (i + 1) * need))} for i in range(batch)]

        def runner_step(start: int, tabs: list[dict[int, list[int]]] = tabs) -> float:
            """One ModelRunner decode step of every sequence at position `start`."""
            chunks = [SeqChunk([7 + i], start, t) for i, t in enumerate(tabs)]
            return 1e3 * _timed(lambda: eng.runner.execute(chunks), dev)[0]

        runner_ms = []
        for k in range(steps):
            runner_ms.append(runner_step(length + k))
        fixed_ms = []  # the same position again and again: every shape seen before
        for _ in range(steps):
            fixed_ms.append(runner_step(length))
        bucket_ms = []  # consecutive positions, cached keys padded to a multiple of BUCKET
        with padded_cache_keys(BUCKET):
            for k in range(steps):
                bucket_ms.append(runner_step(length + steps + k))
        row: dict[str, Any] = {"batch": batch, "context": length,
                               "runner_step_ms": [round(x, 2) for x in runner_ms],
                               "runner_ms_median": round(statistics.median(runner_ms[1:]), 2),
                               "runner_fixed_shape_ms": [round(x, 2) for x in fixed_ms],
                               "runner_fixed_shape_ms_median":
                                   round(statistics.median(fixed_ms[1:]), 2),
                               f"runner_padded_{BUCKET}_ms": [round(x, 2) for x in bucket_ms],
                               "runner_padded_ms_median":
                                   round(statistics.median(bucket_ms[1:]), 2)}
        # the serving path: a request through LLMEngine.step (prefill, then decode steps)
        params = SamplingParams(max_tokens=steps + 2, temperature=0, ignore_eos=True)
        g = torch.Generator().manual_seed(batch * 100003 + length)
        for i in range(batch):
            ids = torch.randint(2, cfg["vocab_size"], (length,), generator=g).tolist()
            eng.add_request(f"decode-bench-{batch}-{length}-{i}", ids, params)
        step_ms = []
        while eng.has_unfinished():
            t0 = time.perf_counter()
            eng.step()
            step_ms.append(1e3 * (time.perf_counter() - t0))
        dec = step_ms[-steps:]  # the decode steps (prefill steps come first)
        row["engine_step_ms"] = [round(x, 2) for x in step_ms]
        row["engine_decode_ms_median"] = round(statistics.median(dec[1:]), 2)
        if hf is not None:
            cache = _hf_cache(hf, cfg, batch, length, dev)
            tok = torch.full((batch, 1), 7, device=dev)
            hf_ms = []

            def hf_step(cache: Any = cache, tok: torch.Tensor = tok) -> Any:
                return hf(input_ids=tok, past_key_values=cache, use_cache=True)

            with torch.inference_mode():
                for _ in range(steps):  # the cache grows by one each step, as in generate
                    hf_ms.append(1e3 * _timed(hf_step, dev)[0])
            row["hf_step_ms"] = [round(x, 2) for x in hf_ms]
            row["hf_ms_median"] = round(statistics.median(hf_ms[1:]), 2)
            row["ratio_hf_over_engine"] = round(row["hf_ms_median"]
                                                / row["engine_decode_ms_median"], 3)
            del cache
        if [batch, length] in [list(x) for x in req.get("profile", [])]:
            last = [SeqChunk([7 + i], length + steps, t) for i, t in enumerate(tabs)]
            eng.runner.execute(last)

            def one_step(chunks: list[SeqChunk] = last) -> Any:
                return eng.runner.execute(chunks)

            row["profile_runner"] = _profile(one_step, dev, top=20)
        rows.append(row)
    return {"rows": rows}


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import sys

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--geometry", default="llama3-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--lengths", default="1024,8192,32768")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--profile-len", type=int, default=0)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--no-ceiling", action="store_true")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from e2e_report import machine_info, print_prefill
    from random_model import random_checkpoint

    from pd_runtime import kvcache
    from pd_runtime.engine.core import engine_from_checkpoint, rank_spec_for

    dev = args.device
    lengths = [int(x) for x in args.lengths.split(",") if x]
    t0 = time.perf_counter()
    ck = random_checkpoint(args.geometry, dev, 0)
    spec = rank_spec_for(ck.config, num_blocks=kvcache.blocks_needed(max(lengths), 16) + 4)
    eng = engine_from_checkpoint(ck, spec, device=dev)
    print(f"{args.geometry} on {dev}: engine ready in {time.perf_counter() - t0:.1f} s, "
          f"fused={eng.runner.model.fused}", flush=True)
    res: dict[str, Any] = {"bench": "prefill", "machine": machine_info(dev), "args": vars(args)}
    res["prefill"] = prefill_bench(eng, ck, {"device": dev, "geometry": args.geometry},
                                   {"lengths": lengths, "reps": args.reps, "hf": not args.no_hf,
                                    "profile_len": args.profile_len, "top": args.top,
                                    "ceiling": not args.no_ceiling})
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    print_prefill(res["prefill"])
    if args.out:
        Path(args.out).write_text(json.dumps(res, separators=(",", ":")) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
