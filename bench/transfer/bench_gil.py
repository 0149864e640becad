"""A pull while the engines' threads hold the GIL: the transfer's cost of Python's switch interval.

In a serving process the transfer runs on threads of its own (P's side-channel thread answers
PREPARE and gathers; D's pull thread plans, reads and scatters) beside the engine's step thread,
which holds the GIL while it dispatches kernels. A thread that wants the GIL back after a system
call (poll, recv, send, a NIXL wait) waits until the holder drops it: at the latest after
`sys.getswitchinterval()`, 5 ms by default. A PREPARE round trip of 5.2 ms and pulls of 9.9 ms
at 8k x 8 on the H200 (docs/performance.md) look like that wait.

This bench runs P (a child process) and D (this process) of the current transfer engine, each
beside an engine-like thread that holds the GIL in bursts (`--burst-ms` of small torch ops, then
`--idle-ms` asleep, as a step ends with a device sync), and pulls with each switch interval of
`--switch-us` in turn (the first, Python's default, is the baseline), interleaved round by round
so that every setting sees the same machine load. Per setting: the pull's wall time, its parts
(bench_host_path.parts) and the engine threads' work done per second (what a shorter interval
costs them). Raw JSON to --out.

    python bench/transfer/bench_gil.py --out bench/transfer/results/cpu_gil.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import threading
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_host_path import (  # noqa: E402  (the same P/D setup, tables and pull parts)
    PARTS,
    _instrument,
    _pull,
    _Timer,
    machine,
    mods,
    parts,
    specs,
    tables,
)

PKG = "pd_runtime"


class EngineLike:
    """A thread busy for `burst_ms`, then asleep `idle_ms` (a step's device sync releases the GIL);
    counts the ops it ran. work "torch": small torch ops (their bindings drop the GIL around each
    op, as the engine's dispatch does); "python": pure Python (holds the GIL until forced off)."""

    def __init__(self, burst_ms: float, idle_ms: float, work: str = "torch"):
        self.burst_s, self.idle_s, self.work = burst_ms / 1e3, idle_ms / 1e3, work
        self.ops = 0
        self.stop = False
        self.thread = threading.Thread(target=self._loop, daemon=True, name="engine-like")
        self.thread.start()

    def close(self) -> None:
        self.stop = True
        self.thread.join()

    def _loop(self) -> None:
        x = torch.zeros(16)
        while not self.stop:
            end = time.perf_counter() + self.burst_s
            n = 0
            while time.perf_counter() < end:
                if self.work == "torch":
                    x.add_(1.0).mul_(0.5)
                else:
                    sum(range(100))
                n += 1
            self.ops += n
            if self.idle_s:
                time.sleep(self.idle_s)


def _prefill_proc(geo: str, max_blocks: int, conn, burst_ms: float, idle_ms: float,
                  busy: bool, work: str) -> None:
    torch.set_num_threads(1)
    worker, kv, planner = mods(PKG)[:3]
    p, _, f = specs(PKG, geo, max_blocks)
    nb = kv.arena_layout(p).nbytes
    torch.manual_seed(7)
    arena = torch.randint(0, 256, (nb,), dtype=torch.uint8)
    rank = worker.PrefillRank(p, f, b"bench", "cpu", staging_bytes=2 * nb + (8 << 20),
                              lease_s=600, arena=arena)
    eng = EngineLike(burst_ms, idle_ms, work) if busy else None
    conn.send(list(rank.address))
    while True:
        msg = conn.recv()
        if msg == "stop":
            break
        if msg == "ops":
            conn.send(eng.ops if eng else 0)
            continue
        switch_us, rid, nbk = msg
        sys.setswitchinterval(switch_us / 1e6)
        pt, _ = tables(nbk, p.num_blocks, nbk)
        rank.hold(rid, planner.Request(nbk * 16, {0: pt}))
        conn.send(None)
    if eng:
        eng.close()
    rank.close()


def run(args) -> dict:
    settings = [int(x) for x in args.switch_us.split(",")]
    sizes = [int(x) for x in args.blocks.split(",")]
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_prefill_proc, args=(args.geometry, max(sizes), child,
                                                    args.burst_ms, args.idle_ms,
                                                    args.busy in ("p", "both"), args.work))
    proc.start()

    def reply():
        if not conn.poll(300):
            raise RuntimeError(f"the prefill process is silent (exit code {proc.exitcode})")
        return conn.recv()

    addr = reply()
    worker, kv, planner, _, kvcopy = mods(PKG)
    _, d, f = specs(PKG, args.geometry, max(sizes))
    arena = torch.zeros(kv.arena_layout(d).nbytes, dtype=torch.uint8)
    dr = worker.DecodeRank(d, f, b"bench", "cpu", arena=arena, timeout=120)
    dr.connect([tuple(addr)])
    timer = _Timer()
    _instrument(dr, kvcopy, timer)
    eng = (EngineLike(args.burst_ms, args.idle_ms, args.work) if args.busy in ("d", "both")
           else None)
    rows, n = [], 0
    # engine work per second under each setting: ops counted over the pulls of that setting
    work = {s: [0.0, 0, 0] for s in settings}  # seconds, D ops, P ops
    for nbk in sizes:
        res: dict[int, list[dict]] = {s: [] for s in settings}
        for i in range(args.warm + args.reps):
            order = settings if i % 2 == 0 else list(reversed(settings))
            for s in order:
                rid = f"g{n}"
                n += 1
                sys.setswitchinterval(s / 1e6)
                conn.send((s, rid, nbk))
                reply()
                pt, dt = tables(nbk, d.num_blocks, nbk)
                preq, dreq = planner.Request(nbk * 16, {0: pt}), planner.Request(nbk * 16, {0: dt})
                time.sleep(args.gap_ms / 1e3)  # lets P's poller free the last slot, untimed
                conn.send("ops")
                p0, d0, t0 = reply(), eng.ops if eng else 0, time.perf_counter()
                st = _pull(dr, timer, rid, preq, dreq)
                conn.send("ops")
                p1, d1, t1 = reply(), eng.ops if eng else 0, time.perf_counter()
                if i >= args.warm:
                    res[s].append(parts(st, timer))
                    w = work[s]
                    w[0] += t1 - t0
                    w[1] += d1 - d0
                    w[2] += p1 - p0
        row: dict = dict(blocks=nbk, tokens=nbk * 16, bytes=int(st.bytes))
        for s, lst in res.items():
            row[str(s)] = {k: float(np.median([r[k] for r in lst])) for k in PARTS}
            row[str(s)]["wall_p90"] = float(np.percentile([r["wall"] for r in lst], 90))
            row[str(s)]["raw"] = lst
        rows.append(row)
        base = row[str(settings[0])]["wall"]
        print(f"{nbk:5d} blocks: " + "; ".join(
            f"{s} us: wall {row[str(s)]['wall'] * 1e3:.2f} ms (p90 "
            f"{row[str(s)]['wall_p90'] * 1e3:.2f}), x{base / row[str(s)]['wall']:.2f}"
            for s in settings), flush=True)
    conn.send("stop")
    proc.join(timeout=30)
    if eng:
        eng.close()
    dr.close()
    sys.setswitchinterval(0.005)
    engine_ops = {str(s): dict(d_ops_per_s=w[1] / w[0], p_ops_per_s=w[2] / w[0])
                  for s, w in work.items() if w[0] > 0}
    for s, e in engine_ops.items():
        print(f"engine-like threads at {s} us: D {e['d_ops_per_s']:.0f} ops/s, "
              f"P {e['p_ops_per_s']:.0f} ops/s (during the pulls)", flush=True)
    return dict(rows=rows, engine_ops=engine_ops)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--switch-us", default="5000,500,200",
                    help="switch intervals (us) compared; the first is the baseline")
    ap.add_argument("--blocks", default="64,512")
    ap.add_argument("--geometry", default="tiny")
    ap.add_argument("--busy", choices=["p", "d", "both", "none"], default="p",
                    help="where an engine-like thread runs (on 2 cores: one side, or the two "
                         "busy threads and NIXL's spinning progress threads fight for cores)")
    ap.add_argument("--burst-ms", type=float, default=20.0,
                    help="GIL held this long per engine-like step")
    ap.add_argument("--work", choices=["torch", "python"], default="torch",
                    help="what the engine-like thread runs (see EngineLike)")
    ap.add_argument("--idle-ms", type=float, default=2.0, help="then asleep this long")
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--gap-ms", type=float, default=3.0)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    info = machine("cpu")
    res = run(args)
    info["loadavg_after"] = os.getloadavg()
    out = dict(bench="gil", date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               machine=info, args=vars(args), seconds=time.time() - t0, **res)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, separators=(",", ":"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
