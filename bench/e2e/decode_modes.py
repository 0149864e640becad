"""Decode steps, old path against new, in one process: ms per step and the logits they give.

One engine (random weights, `--geometry`), B sequences prefilled to a context each, then decode
steps (ModelRunner.execute, one token per sequence, key length growing by one per step as in
serving) under each `runner.decode_mode`:
  old     the previous path: padded gather of every cached key + SDPA, exact key length (a new
          SDPA shape, hence a cuDNN graph build, each step),
  legacy  the same with the cached-key length rounded up to 256 (PD_RUNTIME_KEY_BUCKET),
  paged   kernels.paged_decode reading the block table in place (eager launches),
  graph   paged, the step replayed from a CUDA graph (per batch / table-width bucket).
Every mode runs the same positions with the same token, so each step's logits are comparable:
the greedy token must match legacy's and the max |logit difference| is reported. A last
condition repeats `graph` with a NIXL agent (progress thread on) registering the arena, as D has.

    python bench/e2e/decode_modes.py [--cases 1x8192,8x8192,1x32768] [--steps 24] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--geometry", default="llama3-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--cases", default="1x8192,8x8192,32x1024,1x32768")
    ap.add_argument("--modes", default="old,paged,graph")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--nixl", action="store_true", help="also graph with a NIXL agent")
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    import torch
    from random_model import random_checkpoint

    from pd_runtime import kvcache
    from pd_runtime.engine.core import engine_from_checkpoint, rank_spec_for
    from pd_runtime.engine.runner import SeqChunk

    dev = args.device
    cases = [tuple(int(v) for v in c.split("x")) for c in args.cases.split(",")]
    modes = args.modes.split(",")
    ck = random_checkpoint(args.geometry, dev, 0)
    bs = 16
    def per_seq(ctx: int) -> int:
        return kvcache.blocks_needed(ctx + args.steps + 8, bs)

    need = max(b * per_seq(ctx) for b, ctx in cases)
    eng = engine_from_checkpoint(ck, rank_spec_for(ck.config, num_blocks=need + 4), device=dev)
    runner = eng.runner
    bucket = runner.key_bucket or 256

    def sync() -> None:
        if dev == "cuda":
            torch.cuda.synchronize()

    def tables(i: int, ctx: int) -> dict[int, list[int]]:
        n = per_seq(ctx)
        return {kvcache.GROUP_FULL: list(range(i * n, (i + 1) * n))}

    def steps(b: int, ctx: int) -> tuple[list[float], list[torch.Tensor]]:
        times, logits = [], []
        for k in range(args.steps):
            batch = [SeqChunk([7 + i], ctx + k, tables(i, ctx)) for i in range(b)]
            sync()
            t0 = time.perf_counter()
            out = runner.execute(batch)
            sync()
            times.append(round((time.perf_counter() - t0) * 1e3, 3))
            logits.append(out.float().cpu())
        return times, logits

    res: dict[str, Any] = {"geometry": args.geometry, "steps": args.steps, "rows": [],
                           "gpu": torch.cuda.get_device_name() if dev == "cuda" else "cpu"}
    for b, ctx in cases:
        for i in range(b):  # the prefill: KV of each sequence in its own blocks
            ids = torch.randint(2, ck.config.vocab_size, (ctx,),
                                generator=torch.Generator().manual_seed(i)).tolist()
            runner.decode_mode, runner.key_bucket = "legacy", bucket
            runner.execute([SeqChunk(ids, 0, tables(i, ctx))])
        row: dict[str, Any] = {"batch": b, "context": ctx}
        ref: list[torch.Tensor] = []
        for mode in modes:
            runner.decode_mode = "legacy" if mode == "old" else mode
            runner.key_bucket = 0 if mode == "old" else bucket
            t, lg = steps(b, ctx)
            row[mode + "_ms"] = t
            row[mode + "_median_ms"] = round(statistics.median(t[1:]), 3)
            if not ref:
                ref = lg
                continue
            row[mode + "_tokens_equal"] = all(
                bool((a.argmax(-1) == r.argmax(-1)).all()) for a, r in zip(lg, ref, strict=True)
            )
            row[mode + "_max_abs_logit_diff"] = max(
                float((a - r).abs().max()) for a, r in zip(lg, ref, strict=True)
            )
        if runner.graphs is not None:
            row["graph_captures"] = runner.graphs.captures
        res["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("_ms")}), flush=True)
    if args.nixl and "graph" in modes:
        from pd_runtime.transport import Transport

        tr = Transport("decode-modes", dev)
        assert eng.arena is not None
        tr.register(eng.arena)
        time.sleep(0.5)
        runner.decode_mode = "graph"
        for row in res["rows"]:
            t, _ = steps(row["batch"], row["context"])
            row["graph_nixl_ms"] = t
            row["graph_nixl_median_ms"] = round(statistics.median(t[1:]), 3)
            print(json.dumps({"batch": row["batch"], "context": row["context"],
                              "graph_nixl_median_ms": row["graph_nixl_median_ms"]}), flush=True)
        tr.close()
    print("\n| B x context | " + " | ".join(modes) + " | old / graph |")
    for row in res["rows"]:
        cells = [f"{row[m + '_median_ms']:.2f}" for m in modes]
        ratio = (row["old_median_ms"] / row["graph_median_ms"]
                 if "old" in modes and "graph" in modes else float("nan"))
        print(f"| {row['batch']} x {row['context']} | " + " | ".join(cells) + f" | {ratio:.1f}x |")
    if args.out:
        Path(args.out).write_text(json.dumps(res, separators=(",", ":")) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
