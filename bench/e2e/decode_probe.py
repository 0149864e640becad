"""Why D's decode steps are slower than the aggregated engine's (bench_e2e.py, P/D cells).

One engine process (random weights, `--geometry`), one sequence prefilled to `--context`, then
decode steps (ModelRunner.execute, one token) timed in three conditions, each with the key
length growing by one per step (as serving) and with one shape repeated:
  plain        the engine alone (as the aggregated worker),
  nixl         after a NIXL agent with its progress thread has registered the arena and the
               receive buffer (what D has: DecodeSide -> DecodeRank -> Transport),
  nixl_noprog  the same with an agent created without a progress thread,
  padded       as plain, cached-key length padded to a multiple of 256 (prefill_bench's
               padded_cache_keys: one attention shape per 256 steps).

    python bench/e2e/decode_probe.py [--geometry llama3-8b] [--context 32768] [--out FILE]
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
    ap.add_argument("--contexts", default="32768,8192")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    import torch
    from prefill_bench import padded_cache_keys
    from random_model import random_checkpoint

    from pd_runtime import kvcache
    from pd_runtime.engine.core import engine_from_checkpoint, rank_spec_for
    from pd_runtime.engine.runner import SeqChunk

    dev = args.device
    contexts = [int(x) for x in args.contexts.split(",")]
    ck = random_checkpoint(args.geometry, dev, 0)
    bs = 16
    need = kvcache.blocks_needed(max(contexts) + 3 * args.steps + 8, bs)
    eng = engine_from_checkpoint(ck, rank_spec_for(ck.config, num_blocks=need + 4), device=dev)
    table = {kvcache.GROUP_FULL: list(range(need))}

    def sync() -> None:
        if dev == "cuda":
            torch.cuda.synchronize()

    def steps(start: int, grow: bool) -> list[float]:
        out = []
        for k in range(args.steps):
            c = [SeqChunk([7], start + (k if grow else 0), table)]
            sync()
            t0 = time.perf_counter()
            eng.runner.execute(c)
            sync()
            out.append(round((time.perf_counter() - t0) * 1e3, 2))
        return out

    res: dict[str, Any] = {"geometry": args.geometry, "rows": []}
    for ctx in contexts:
        ids = torch.randint(2, ck.config.vocab_size, (ctx,)).tolist()
        eng.runner.execute([SeqChunk(ids, 0, table)])  # the prefill: KV in blocks 0..
        base = ctx
        row: dict[str, Any] = {"context": ctx}
        row["plain_growing_ms"] = steps(base, True)
        row["plain_fixed_ms"] = steps(base, False)
        base += args.steps
        with padded_cache_keys(256):
            row["padded_growing_ms"] = steps(base, True)
        base += args.steps
        res["rows"].append(row)
    # the same with a NIXL agent holding the arena and a receive buffer registered, as D does:
    # first with the runtime's Transport (progress thread on), then an agent without one
    from pd_runtime.transport import Transport, import_nixl

    assert eng.arena is not None
    recv = torch.zeros(eng.arena.numel(), dtype=torch.uint8, device=dev)
    for variant in ("nixl", "nixl_noprog"):
        if variant == "nixl":
            tr: Any = Transport("decode-probe", dev)
            tr.register(eng.arena)
            tr.register(recv)
        else:
            agent_cls, cfg_cls = import_nixl()
            tr = agent_cls("decode-probe-noprog", cfg_cls(enable_prog_thread=False,
                                                          backends=["UCX"]))
            mem = "VRAM" if dev == "cuda" else "DRAM"
            for t in (eng.arena, recv):
                tr.register_memory([(t.data_ptr(), t.numel(), 0, "")], mem)
        time.sleep(0.5)
        for row in res["rows"]:
            ctx = row["context"]
            ids = torch.randint(2, ck.config.vocab_size, (ctx,)).tolist()
            eng.runner.execute([SeqChunk(ids, 0, table)])
            row[variant + "_growing_ms"] = steps(ctx + 2 * args.steps, True)
            row[variant + "_fixed_ms"] = steps(ctx, False)
        if variant == "nixl":
            tr.close()
        del tr
    for row in res["rows"]:
        for k in list(row):
            if k.endswith("_ms"):
                row[k.replace("_ms", "_median_ms")] = round(statistics.median(row[k][1:]), 2)
        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(res, separators=(",", ":")) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
