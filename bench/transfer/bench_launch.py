"""Host time of one template-kernel launch: Triton's JIT dispatch against the direct launch of
the compiled kernel (kernels/kvcopy.py, PD_RUNTIME_KV_LAUNCH=jit|direct), in one run.

Per case (Llama-3-8B geometry, bf16, 16-token blocks; P TP 1 -> D TP 1 and the head split
P TP 1 -> D TP 2) and table size it builds one gather and one scatter program per launch mode
and times `KVProgram.run` with the tables already on the device, as D's pull and P's hold() call
it: the host wall time of the call, the copy waited for outside the timing. The two modes
alternate call by call (the order flips every round). After the timed calls it checks that both
modes wrote the same bytes (the staging slot after the gather, the decode arena after the
scatter). With --nixl every case runs again with a NIXL agent alive in the process (UCX, its
progress thread on, both arenas registered, no transfer running), as in P's and D's processes:
inside a pull D's scatter call took 150-200 µs (h200_run20_host_path.log) against 40-60 µs here
without an agent.

    python bench/transfer/bench_launch.py --out bench/transfer/results/h200_launch.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np
import torch

from pd_runtime.kernels.kvcopy import KVProgram, upload_all
from pd_runtime.kvcache import ModelSpec, RankSpec, arena_layout
from pd_runtime.planner import Request
from pd_runtime.template import PairTemplate

MODES = ("jit", "direct")
CASES = {"tp1-tp1": (1, 1), "tp1-tp2-head-split": (1, 2)}


def programs(tm: PairTemplate, mode: str) -> tuple[KVProgram, KVProgram]:
    direct = mode == "direct"
    return (KVProgram(tm.gather, "cuda", True, direct=direct),
            KVProgram(tm.scatter, "cuda", False, direct=direct))


def one_case(p_tp: int, d_tp: int, nb: int, reps: int, nixl: bool) -> list[dict]:
    m = ModelSpec(num_layers=32, num_kv_heads=8, head_size=128)
    T = nb * 16
    p = RankSpec(m, p_tp, 0, 16, "HND", nb + 8)
    d = RankSpec(m, d_tp, 0, 16, "HND", nb + 8)
    rng = np.random.default_rng(nb)
    preq = Request(T, {0: [int(x) for x in rng.permutation(p.num_blocks)[:nb]]})
    dreq = Request(T, {0: [int(x) for x in rng.permutation(d.num_blocks)[:nb]]})
    tm = PairTemplate(p, d)
    nbytes = tm.nbytes(T)
    p_arena = torch.randint(0, 256, (arena_layout(p).nbytes,), dtype=torch.uint8, device="cuda")
    progs = {mode: programs(tm, mode) for mode in MODES}
    slots = {mode: torch.zeros(nbytes + 256, dtype=torch.uint8, device="cuda") for mode in MODES}
    d_arenas = {mode: torch.zeros(arena_layout(d).nbytes, dtype=torch.uint8, device="cuda")
                for mode in MODES}
    agent = None
    if nixl:
        from pd_runtime.transport import Transport

        agent = Transport(f"launch-bench-{nb}-{d_tp}", "cuda")
        for t in (p_arena, *slots.values(), *d_arenas.values()):
            agent.register(t)
    pdyn, ddyn = tm.dyn("prefill", preq, T), tm.dyn("decode", dreq, T)
    gbt, sbt = upload_all(torch.device("cuda"), [(pdyn, 0), (ddyn, 0)])
    times: dict[tuple[str, str], list[float]] = {(s, mo): [] for s in ("gather", "scatter")
                                                 for mo in MODES}
    for i in range(reps + 5):
        for mode in (MODES if i % 2 == 0 else MODES[::-1]):
            g, s = progs[mode]
            for side, prog, src, dst, dyn, bt in (
                    ("gather", g, p_arena, slots[mode], pdyn, gbt),
                    ("scatter", s, slots[mode], d_arenas[mode], ddyn, sbt)):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                prog.run(src, dst, dyn, 0, bt)
                t1 = time.perf_counter()
                torch.cuda.synchronize()
                if i >= 5:
                    times[(side, mode)].append(t1 - t0)
    if agent is not None:
        agent.close()
    same = (torch.equal(slots["jit"], slots["direct"])
            and torch.equal(d_arenas["jit"], d_arenas["direct"]))
    direct_used = all(k.form in ("all", "plain") for prog in progs["direct"]
                      for c in prog.classes for k in c.compiled.values())
    rows = []
    for side in ("gather", "scatter"):
        med = {mo: statistics.median(times[(side, mo)]) * 1e6 for mo in MODES}
        p90 = {mo: float(np.percentile(times[(side, mo)], 90)) * 1e6 for mo in MODES}
        rows.append({"nixl_agent": nixl, "p_tp": p_tp, "d_tp": d_tp, "blocks": nb,
                     "bytes": nbytes, "side": side,
                     "jit_us": round(med["jit"], 1), "direct_us": round(med["direct"], 1),
                     "jit_p90_us": round(p90["jit"], 1), "direct_p90_us": round(p90["direct"], 1),
                     "ratio": round(med["jit"] / med["direct"], 2), "same_bytes": same,
                     "direct_used": direct_used})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", default="64,512,2048")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--nixl", action="store_true", help="also with a NIXL agent in the process")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    rows = []
    for case, (p_tp, d_tp), nb, nixl in [
            (case, tps, int(nb), nixl) for nixl in ((False, True) if a.nixl else (False,))
            for case, tps in CASES.items() for nb in a.blocks.split(",")]:
        for r in one_case(p_tp, d_tp, nb, a.reps, nixl):
            r["case"] = case
            rows.append(r)
            print(f"{'nixl ' if nixl else ''}{case:20s} {nb:5d} blocks {r['side']:7s} "
                  f"jit {r['jit_us']:7.1f} us "
                  f"(p90 {r['jit_p90_us']:7.1f})  direct {r['direct_us']:7.1f} us "
                  f"(p90 {r['direct_p90_us']:7.1f})  x{r['ratio']:.2f}  "
                  f"same={r['same_bytes']} direct_used={r['direct_used']}", flush=True)
    import triton

    res = {"bench": "launch", "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "triton": triton.__version__, "host": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "reps": a.reps, "rows": rows}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, separators=(",", ":"))
    ok = all(r["same_bytes"] and r["direct_used"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
