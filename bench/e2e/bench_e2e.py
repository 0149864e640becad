"""Serving latency of the builtin engine: P/D (two processes on one GPU) against aggregated.

Random weights at a real geometry (Llama-3-8B by default: 32 layers, 8 KV heads, head size 128,
bf16), built on the device in each process from one seed. In one run:

1. Aggregated: one engine process; waves of C concurrent requests with L-token prompts, greedy,
   G new tokens each. Time to first token (TTFT) from the moment the driver sends the request,
   inter-token latency (ITL) from the engine's emission times.
2. Disaggregated: a prefill (P) and a decode (D) engine process on the same card. The driver
   plays vllm-router's part: the request goes to P with kv_transfer_params do_remote_decode
   (max_tokens 1); P's answer goes to D, which pulls the KV (NIXL, VRAM -> VRAM), computes the
   last prompt token and decodes. TTFT = D's first token - the send to P. The pull's share of
   TTFT is D's wall time inside DecodeSide.pull over TTFT.
3. Prefill tokens/s of the engine's ModelRunner against Hugging Face transformers on the same
   weights (prefill_bench.py), with model FLOPs utilisation.

With --d-tp 2 the decode pool has two TP ranks (two processes on the same card, a gloo group:
PD_RUNTIME_TP_BACKEND=gloo, since NCCL refuses two ranks on one GPU) against P's single rank:
each D rank pulls its half of the KV heads from P (the planner's head split, VRAM -> VRAM) and
the pull times are reported per rank; the decode steps' all_reduces go through host copies
(gloo), so the P/D ITL of this mode is not a TP 2 deployment's ITL.

No HTTP: the servers' own overhead is not in these figures (the driver's pipe hop is, and is
reported). Prints a table and writes JSON.

    python bench/e2e/bench_e2e.py --out e2e.json                       # GPU, Llama-3-8B
    python bench/e2e/bench_e2e.py --geometry tiny --device cpu --out x  # the logic, on a CPU
    python bench/e2e/bench_e2e.py --d-tp 2 --prompts 1024,8192 --concurrency 1 ...  # P TP1 -> D TP2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import secrets
import statistics
import sys
import time
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from e2e_report import machine_info, print_prefill, print_profile  # noqa: E402
from e2e_worker import ROUTER_P_PARAMS, worker_main  # noqa: E402
from random_model import GEOMETRIES  # noqa: E402


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from pd_runtime.serve.cli import GIL_SWITCH_US

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--geometry", default="llama3-8b", choices=sorted(GEOMETRIES))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--prompts", type=_ints, default=[1024, 8192, 32768])
    ap.add_argument("--concurrency", type=_ints, default=[1, 8])
    ap.add_argument("--max-cell-tokens", type=int, default=65536,
                    help="skip cells whose prompts add up to more tokens than this")
    ap.add_argument("--gen", type=int, default=32, help="new tokens per request")
    ap.add_argument("--p-staging-requests", type=int, default=2,
                    help="P's staging region in requests of the largest size (at most twice "
                         "the arena); P gathers at hold() only while half of it stays free")
    ap.add_argument("--reps", type=int, default=3, help="waves per cell at concurrency 1")
    ap.add_argument("--reps-concurrent", type=int, default=2, help="waves per cell above 1")
    ap.add_argument("--prefill-lengths", type=_ints, default=[1024, 8192, 32768])
    ap.add_argument("--prefill-reps", type=int, default=3)
    ap.add_argument("--profile-len", type=int, default=8192)
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--decode-cases", default="1x1024,1x8192,8x1024,8x8192",
                    help="BxL decode steps timed against transformers ('' to skip)")
    ap.add_argument("--decode-profile", default="1x8192,8x1024")
    ap.add_argument("--modes", default="aggregated,pd")
    ap.add_argument("--d-tp", type=int, default=1,
                    help="TP ranks of the decode pool (processes on the one device; >1: gloo)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--layout", default="HND", choices=["HND", "NHD"])
    ap.add_argument("--deadline-s", type=float, default=480.0,
                    help="start no new cell after this many seconds (the rest: listed as skipped)")
    ap.add_argument("--wave-timeout-s", type=float, default=240.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gil-switch-interval-us", type=int, default=GIL_SWITCH_US,
                    help="every engine process's sys.setswitchinterval, as pd-runtime serve "
                         f"sets it (default {GIL_SWITCH_US}, serve's; Python's own is 5000)")
    ap.add_argument("--out", default=str(HERE / "results" / "e2e.json"))
    return ap.parse_args(argv)


class Worker:
    """An engine process; `ready()` waits for its model and engine to be built."""

    def __init__(self, ctx: Any, role: str, opts: dict[str, Any], name: str | None = None):
        self.role = name or role
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker_main, args=(child, role, opts), daemon=True,
                                name=f"e2e-{self.role}")
        self.proc.start()
        child.close()
        self.info: dict[str, Any] = {}

    def ready(self, timeout: float = 600.0) -> Worker:
        self.info = self.expect("ready", timeout)
        print(f"{self.role} ready: {self.info}", flush=True)
        return self

    def recv(self, timeout: float) -> tuple:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"{self.role}: no answer within {timeout:.0f} s")
        msg = self.conn.recv()
        if msg[0] == "error":
            raise RuntimeError(msg[1])
        return msg

    def expect(self, op: str, timeout: float = 600.0) -> Any:
        """The next reply named `op` (output messages in between are a bug: none are pending)."""
        msg = self.recv(timeout)
        if msg[0] != op:
            raise RuntimeError(f"{self.role}: expected {op!r}, got {msg[0]!r}")
        return msg[1] if len(msg) == 2 else msg[1:]

    def call(self, op: str, *args: Any, timeout: float = 600.0) -> Any:
        self.conn.send((op, *args))
        return self.expect(op, timeout)

    def stop(self) -> None:
        try:
            if self.proc.is_alive():
                self.conn.send(("stop",))
                self.expect("stopped", 60)
        except Exception as e:  # noqa: BLE001 - stopping anyway
            print(f"{self.role}: stop: {e}", file=sys.stderr)
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


# ---- one wave of concurrent requests ----------------------------------------------------------

def _prep(workers: list[Worker], rids: list[str], seeds: list[int], length: int) -> None:
    for w in workers:
        for rid, s in zip(rids, seeds, strict=True):
            w.conn.send(("prep", rid, s, length))


def _token_times(times: dict[str, list[float]], t: float, outs: list, done: set[str]) -> None:
    for rid, n, finished, _kv, err in outs:
        if err:
            raise RuntimeError(f"request {rid} failed: {err}")
        times[rid].extend([t] * n)
        if finished:
            done.add(rid)


def wave_aggregated(agg: Worker, rids: list[str], seeds: list[int], length: int, gen: int,
                    timeout: float) -> list[dict[str, Any]]:
    _prep([agg], rids, seeds, length)
    t0 = {}
    for rid in rids:
        t0[rid] = time.perf_counter()
        agg.conn.send(("add", rid, gen, None))
    times: dict[str, list[float]] = {r: [] for r in rids}
    done: set[str] = set()
    end = time.perf_counter() + timeout
    while len(done) < len(rids):
        msg = agg.recv(max(0.1, end - time.perf_counter()))
        if msg[0] == "outs":
            _token_times(times, msg[1], msg[2], done)
    return [_request_result(t0[r], times[r]) for r in rids]


def wave_pd(p: Worker, d: Worker, rids: list[str], seeds: list[int], length: int, gen: int,
            timeout: float, d_ranks: list[Worker] | None = None) -> list[dict[str, Any]]:
    """vllm-router's part: the request to P (max_tokens 1, do_remote_decode), P's
    kv_transfer_params to D, D's tokens are the client's. `d_ranks`: D's ranks 1.. (TP), asked
    for their own pulls after the wave."""
    _prep([p, d], rids, seeds, length)
    t0: dict[str, float] = {}
    for rid in rids:
        t0[rid] = time.perf_counter()
        p.conn.send(("add", rid, 1, dict(ROUTER_P_PARAMS)))
    p_done: dict[str, float] = {}
    forwarded: dict[str, float] = {}
    tids: dict[str, str] = {}
    times: dict[str, list[float]] = {r: [] for r in rids}
    done: set[str] = set()
    end = time.perf_counter() + timeout
    while len(done) < len(rids):
        ready = wait([p.conn, d.conn], max(0.1, end - time.perf_counter()))
        if not ready:
            raise TimeoutError(f"P/D wave: {len(done)}/{len(rids)} requests after {timeout} s")
        if p.conn in ready:
            msg = p.recv(1)
            if msg[0] == "outs":
                for rid, _n, finished, kv, err in msg[2]:
                    if err:
                        raise RuntimeError(f"P: request {rid} failed: {err}")
                    if finished:
                        if kv is None:
                            raise RuntimeError(f"P: request {rid} ended without kv_transfer_params")
                        p_done[rid] = msg[1]
                        tids[rid] = kv.get("remote_request_id", "")
                        d.conn.send(("add", rid, gen, kv))
                        forwarded[rid] = time.perf_counter()
        if d.conn in ready:
            msg = d.recv(1)
            if msg[0] == "outs":
                _token_times(times, msg[1], msg[2], done)
    log = d.call("log")
    rank_logs = [log.get("rank_pulls", {})] + [w.call("log")["rank_pulls"]
                                                for w in d_ranks or []]
    res = []
    for r in rids:
        row = _request_result(t0[r], times[r])
        pl = log["pulls"].get(r, {})
        if d_ranks:  # each D rank's own pull of its KV heads: wall time, bytes, PullStats
            row["pull_ranks"] = [_rank_pull(k, rl.get(tids[r], {}), t0[r])
                                 for k, rl in enumerate(rank_logs)]
        row.update({"p_done_s": p_done[r] - t0[r], "forwarded_s": forwarded[r] - t0[r],
                    "d_added_s": log["added"][r] - t0[r]})
        if pl:
            row.update({"pull_start_s": pl["t_start"] - t0[r], "pull_end_s": pl["t_end"] - t0[r],
                        "pull_wall_s": pl["wall_s"], "pull_bytes": pl.get("bytes", 0)})
            for k in ("read_seconds", "prepare_seconds", "gather_seconds", "scatter_seconds",
                      "plan_seconds", "seconds"):
                if k in pl:
                    row["pull_" + k.replace("_seconds", "_s").replace("seconds", "rank_s")] = pl[k]
            if "pull_rank_s" in row:  # the transfer engine's own time minus its data path
                row["pull_host_overhead_s"] = row["pull_rank_s"] - sum(
                    row.get(k, 0.0) for k in ("pull_gather_s", "pull_read_s", "pull_scatter_s"))
            row["first_token_after_pull_s"] = row["ttft_s"] - row["pull_end_s"]
            row["pull_share_of_ttft"] = pl["wall_s"] / row["ttft_s"]
        res.append(row)
    _wait_released(p)
    return res


def _rank_pull(rank: int, pl: dict[str, Any], t0: float) -> dict[str, Any]:
    if not pl:
        raise RuntimeError(f"D rank {rank} has no record of the pull")
    out = {"rank": rank, "start_s": pl["t_start"] - t0, "end_s": pl["t_end"] - t0,
           "wall_s": pl["wall_s"], "bytes": pl.get("bytes", 0)}
    for k in ("seconds", "read_seconds", "prepare_seconds", "gather_seconds", "scatter_seconds",
              "plan_seconds", "descriptors"):
        if k in pl:
            out[k] = pl[k]
    return out


def _wait_released(p: Worker, timeout: float = 30.0) -> None:
    """P frees the blocks D has read on its own step loop; start the next wave clean."""
    end = time.perf_counter() + timeout
    while time.perf_counter() < end:
        if p.call("stats", timeout=30).get("kv_held", 0) == 0:
            return
        time.sleep(0.01)
    raise RuntimeError("P still holds blocks after the wave (D did not release them)")


def _request_result(t0: float, times: list[float]) -> dict[str, Any]:
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return {"ttft_s": times[0] - t0, "e2e_s": times[-1] - t0, "tokens": len(times),
            "itl_s": gaps}


# ---- summaries --------------------------------------------------------------------------------

def _q(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def summarize(reqs: list[dict[str, Any]]) -> dict[str, Any]:
    ttft = [r["ttft_s"] for r in reqs]
    itl = [g for r in reqs for g in r["itl_s"]]
    s: dict[str, Any] = {
        "requests": len(reqs),
        "ttft_ms_median": 1e3 * statistics.median(ttft), "ttft_ms_p90": 1e3 * _q(ttft, 0.9),
        "ttft_ms_max": 1e3 * max(ttft),
        "itl_ms_median": 1e3 * statistics.median(itl) if itl else None,
        "itl_ms_p90": 1e3 * _q(itl, 0.9) if itl else None,
        "e2e_ms_median": 1e3 * statistics.median(r["e2e_s"] for r in reqs),
    }
    if "pull_wall_s" in reqs[0]:
        pulls = [r["pull_wall_s"] for r in reqs]
        s.update({
            "pull_ms_median": 1e3 * statistics.median(pulls),
            "pull_bytes": reqs[0]["pull_bytes"],
            "pull_gbps_median": reqs[0]["pull_bytes"] / statistics.median(pulls) / 1e9,
            "pull_share_of_ttft_median": statistics.median(r["pull_share_of_ttft"] for r in reqs),
            "p_done_ms_median": 1e3 * statistics.median(r["p_done_s"] for r in reqs),
            # P's answer -> the driver's send to D ("router" hop), and the send -> D's step loop
            # taking it (D is busy stepping meanwhile)
            "hop_ms_median": 1e3 * statistics.median(r["forwarded_s"] - r["p_done_s"]
                                                     for r in reqs),
            "d_pickup_ms_median": 1e3 * statistics.median(r["d_added_s"] - r["forwarded_s"]
                                                          for r in reqs),
            "first_token_after_pull_ms_median":
                1e3 * statistics.median(r["first_token_after_pull_s"] for r in reqs),
        })
        for k in ("pull_read_s", "pull_prepare_s", "pull_gather_s", "pull_scatter_s",
                  "pull_plan_s", "pull_rank_s", "pull_host_overhead_s"):
            if k in reqs[0]:
                s[k[:-2] + "_ms_median"] = 1e3 * statistics.median(r[k] for r in reqs)
    if "pull_ranks" in reqs[0]:  # per D rank: its own pull (wall), READ, bytes, GB/s over wall
        for k in range(len(reqs[0]["pull_ranks"])):
            rows = [r["pull_ranks"][k] for r in reqs]
            wall = statistics.median(x["wall_s"] for x in rows)
            s[f"rank{k}_pull_ms_median"] = 1e3 * wall
            s[f"rank{k}_pull_bytes"] = rows[0]["bytes"]
            s[f"rank{k}_pull_gbps_median"] = rows[0]["bytes"] / wall / 1e9
            for f in ("seconds", "read_seconds", "prepare_seconds", "gather_seconds",
                      "scatter_seconds"):
                if f in rows[0]:
                    name = "transfer" if f == "seconds" else f.replace("_seconds", "")
                    s[f"rank{k}_{name}_ms_median"] = 1e3 * statistics.median(x[f] for x in rows)
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()}


# ---- the run ----------------------------------------------------------------------------------

def cells_of(args: argparse.Namespace) -> list[tuple[int, int]]:
    return [(length, c) for length in args.prompts for c in args.concurrency
            if length * c <= args.max_cell_tokens]


def worker_opts(args: argparse.Namespace) -> dict[str, Any]:
    from pd_runtime import kvcache

    cells = cells_of(args)
    bs = args.block_size
    per_cell = [c * kvcache.blocks_needed(length + args.gen + 1, bs) for length, c in cells]
    need = max(per_cell + [kvcache.blocks_needed(max(args.prefill_lengths, default=1), bs)])
    opts = {"geometry": args.geometry, "device": args.device, "seed": args.seed,
            "block_size": bs, "layout": args.layout, "num_blocks": need + 16,
            "max_num_seqs": args.max_num_seqs,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "token": secrets.token_hex(16), "lease_s": 120.0, "pull_timeout_s": 60.0,
            "switch_interval_us": args.gil_switch_interval_us,
            "p_staging_requests": args.p_staging_requests,
            "max_request_tokens": max((length for length, _ in cells), default=1) + args.gen + 1}
    if args.d_tp > 1:
        opts.update({"d_tp": args.d_tp, "tp_init": f"tcp://127.0.0.1:{_free_port()}"})
    return opts


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_cells(mode: str, workers: dict[str, Worker], args: argparse.Namespace,
              t_start: float, skipped: list[str]) -> list[dict[str, Any]]:
    out = []
    # warm-up: first cuBLAS / SDPA / Triton (kvcopy) launches, NIXL connection and handshake
    for length in sorted({cell[0] for cell in cells_of(args)}):
        _wave(mode, workers, ["warm"], [99], length, 2, args)
    for length, c in cells_of(args):
        if time.perf_counter() - t_start > args.deadline_s:
            skipped.append(f"{mode} {length}x{c}: past the deadline")
            continue
        reps = args.reps if c == 1 else args.reps_concurrent
        reqs: list[dict[str, Any]] = []
        for rep in range(reps):
            rids = [f"{mode}-{length}-{c}-{rep}-{i}" for i in range(c)]
            seeds = [hash((length, c, rep, i)) & 0xFFFFFFFF for i in range(c)]
            reqs += _wave(mode, workers, rids, seeds, length, args.gen, args)
        s = summarize(reqs)
        print(f"  {mode:10} prompt {length:>6} x{c:<3} TTFT {s['ttft_ms_median']:9.1f} ms  "
              f"ITL {s['itl_ms_median'] or 0:7.2f} ms"
              + (f"  pull {s['pull_ms_median']:7.2f} ms ({s['pull_share_of_ttft_median']:.1%})"
                 if "pull_ms_median" in s else ""), flush=True)
        out.append({"mode": mode, "prompt_tokens": length, "concurrency": c, "reps": reps,
                    "gen_tokens": args.gen, "summary": s,
                    "requests": [_rounded(r) for r in reqs]})
    return out


def _rounded(v: Any) -> Any:
    if isinstance(v, float):
        return round(v, 6)
    if isinstance(v, list):
        return [_rounded(x) for x in v]
    if isinstance(v, dict):
        return {k: _rounded(x) for k, x in v.items()}
    return v


_wave_no = [0]


def _wave(mode: str, workers: dict[str, Worker], rids: list[str], seeds: list[int], length: int,
          gen: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    _wave_no[0] += 1
    rids = [f"w{_wave_no[0]}-{r}" for r in rids]  # request ids never repeat
    if mode == "aggregated":
        return wave_aggregated(workers["aggregated"], rids, seeds, length, gen,
                               args.wave_timeout_s)
    d_ranks = [w for k, w in workers.items() if k.startswith("decode-rank")]
    return wave_pd(workers["prefill"], workers["decode"], rids, seeds, length, gen,
                   args.wave_timeout_s, d_ranks)


def _decode_req(args: argparse.Namespace) -> dict[str, Any] | None:
    def pairs(s: str) -> list[list[int]]:
        return [[int(v) for v in x.split("x")] for x in s.split(",") if x.strip()]

    cases = pairs(args.decode_cases)
    return {"cases": cases, "profile": pairs(args.decode_profile), "steps": 8} if cases else None


def print_tables(result: dict[str, Any]) -> None:
    by = {(c["mode"], c["prompt_tokens"], c["concurrency"]): c["summary"] for c in result["cells"]}
    keys = sorted({(k[1], k[2]) for k in by})
    d_tp = result["args"].get("d_tp", 1)
    print(f"\nServing: P/D (P TP 1, D TP {d_tp}; {1 + d_tp} processes, one device) against "
          "aggregated; medians over requests")
    print(f"{'prompt':>7} {'conc':>4} | {'TTFT agg':>9} {'TTFT P/D':>9} {'P/D/agg':>7} | "
          f"{'ITL agg':>8} {'ITL P/D':>8} | {'pull ms':>8} {'GB/s':>6} {'pull/TTFT':>9} "
          f"{'hop ms':>6}")
    for length, c in keys:
        a, p = by.get(("aggregated", length, c)), by.get(("pd", length, c))

        def f(s: dict | None, k: str, w: int, spec: str = ".1f") -> str:
            return f"{s[k]:{w}{spec}}" if s and s.get(k) is not None else f"{'-':>{w}}"

        ratio = (f"{p['ttft_ms_median'] / a['ttft_ms_median']:7.2f}" if a and p else f"{'-':>7}")
        print(f"{length:>7} {c:>4} | {f(a, 'ttft_ms_median', 9)} {f(p, 'ttft_ms_median', 9)} "
              f"{ratio} | {f(a, 'itl_ms_median', 8, '.2f')} {f(p, 'itl_ms_median', 8, '.2f')} | "
              f"{f(p, 'pull_ms_median', 8, '.2f')} {f(p, 'pull_gbps_median', 6)} "
              f"{f(p, 'pull_share_of_ttft_median', 9, '.2%')} {f(p, 'hop_ms_median', 6, '.2f')}")
        for k in range(d_tp if p and "rank0_pull_ms_median" in p else 0):
            print(f"{'':>12} D rank {k}: pull {f(p, f'rank{k}_pull_ms_median', 7, '.2f')} ms "
                  f"({p[f'rank{k}_pull_bytes'] / 2**20:.1f} MiB, "
                  f"{f(p, f'rank{k}_pull_gbps_median', 5)} GB/s), transfer engine "
                  f"{f(p, f'rank{k}_transfer_ms_median', 6, '.2f')} ms, READ "
                  f"{f(p, f'rank{k}_read_ms_median', 6, '.2f')} ms")
    pf = result.get("prefill")
    if pf:
        print_prefill(pf, top=10)
    dec = (pf or {}).get("decode")
    if dec:
        print("\nDecode step, B sequences at context L (ms): ModelRunner alone, a whole "
              "LLMEngine step, transformers (DynamicCache)")
        print(f"{'B':>3} {'L':>6} | {'runner':>8} {'engine':>8} {'HF':>8} {'HF/engine':>9}")
        for r in dec["rows"]:
            if "skipped" in r:
                continue
            print(f"{r['batch']:>3} {r['context']:>6} | {r['runner_ms_median']:8.2f} "
                  f"{r['engine_decode_ms_median']:8.2f} {r.get('hf_ms_median', 0):8.2f} "
                  f"{r.get('ratio_hf_over_engine', 0):9.3f}")
            print(f"       runner steps {r['runner_step_ms']}")
            print(f"       engine steps {r['engine_step_ms']}")
        for r in dec["rows"]:
            if r.get("profile_runner"):
                print_profile(f"runner decode step B={r['batch']} L={r['context']}",
                              r["profile_runner"], top=14)
    if result.get("skipped"):
        print("\nskipped: " + "; ".join(result["skipped"]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda":
        from pd_runtime.transport import default_env

        default_env("cuda")  # UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y, UCX_TLS (children inherit)
        if args.d_tp > 1:  # D's ranks share the one card: NCCL refuses that, gloo does not
            os.environ.setdefault("PD_RUNTIME_TP_BACKEND", "gloo")
    t_start = time.perf_counter()
    ctx = mp.get_context("spawn")
    opts = worker_opts(args)
    modes = [m for m in args.modes.split(",") if m]
    result: dict[str, Any] = {"bench": "e2e", "machine": machine_info(args.device),
                              "args": vars(args), "worker_opts": {k: v for k, v in opts.items()
                                                                  if k != "token"},
                              "cells": [], "skipped": [], "workers": {}}
    print(f"{args.geometry} on {args.device}: cells {cells_of(args)}, {opts['num_blocks']} "
          f"blocks of {args.block_size} per engine", flush=True)
    if "aggregated" in modes:
        agg = Worker(ctx, "aggregated", opts)
        try:
            result["workers"]["aggregated"] = agg.ready().info
            result["cells"] += run_cells("aggregated", {"aggregated": agg}, args, t_start,
                                         result["skipped"])
            if args.prefill_lengths:
                result["prefill"] = agg.call("prefill_bench", {
                    "lengths": args.prefill_lengths, "reps": args.prefill_reps,
                    "hf": not args.no_hf, "profile_len": args.profile_len,
                    "decode": _decode_req(args)}, timeout=600)
        finally:
            agg.stop()
    if "pd" in modes:
        workers: dict[str, Worker] = {}
        try:
            workers["prefill"] = Worker(ctx, "prefill", opts)  # all build at once
            workers["decode"] = Worker(ctx, "decode", opts)
            for r in range(1, args.d_tp):
                workers[f"decode-rank{r}"] = Worker(ctx, "decode", {**opts, "tp_rank": r},
                                                    name=f"decode-rank{r}")
            for k, w in workers.items():
                result["workers"][k] = w.ready().info
            result["cells"] += run_cells("pd", workers, args, t_start, result["skipped"])
        finally:
            for w in workers.values():
                w.stop()
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, separators=(",", ":")) + "\n")
    print_tables(result)
    print(f"\nwrote {args.out} ({result['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
