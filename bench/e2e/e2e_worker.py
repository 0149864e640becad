"""One engine in its own process for bench_e2e.py: aggregated, prefill (P) or decode (D).

The driver talks to it over a multiprocessing Pipe; every message is a tuple:

    ("prep", rid, seed, length)          build a prompt (random ids) before the clock starts
    ("add", rid, max_tokens, kv_params)  add the prepared prompt as a request (greedy)
    ("log",)                             -> ("log", {rid: pull record}) D: per-pull timings
    ("prefill_bench", {...})             -> ("prefill_bench", {...}) the engine against
                                            transformers, same weights (aggregated only)
    ("stats",) -> ("stats", snapshot);  ("stop",)

It answers ("outs", t, [(rid, n_tokens, finished, kv_transfer_params, error)]) after every engine
step that produced output, `t` being time.perf_counter() right after the step (CLOCK_MONOTONIC:
comparable between processes of one machine).

The engine runs exactly as `pd-runtime serve` builds it (engine_from_checkpoint, the P/D sides of
engine/pd.py), on random weights. Two instruments are added in this process only: D's
`DecodeSide.pull` and `worker.DecodeRank.pull` are wrapped to record each pull's wall time and
PullStats (PREPARE round trip, P's gather, READ, scatter).

D with tensor parallelism (opts d_tp > 1, tp_init, tp_rank): every D rank is a process of this
module, started by the driver. Rank 0 is the engine the driver talks to, wrapped as
engine/tp_worker.py's rank 0 wraps it (TPRunner, TPDecodeSide: every order broadcast over the
group); ranks 1.. run tp_worker.serve_orders, and answer ("log",) from a thread with their own
pulls (keyed by transfer id). Each rank pulls its KV heads from P (the planner's head split).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
import uuid
from multiprocessing.connection import Connection
from typing import Any

ROUTER_P_PARAMS = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                   "remote_block_ids": None, "remote_host": None, "remote_port": None}


def worker_main(conn: Connection, role: str, opts: dict[str, Any]) -> None:
    try:
        _serve(conn, role, opts)
    except BaseException as e:  # the driver must hear about it, not hang
        import traceback

        conn.send(("error", f"{role}: {type(e).__name__}: {e}\n{traceback.format_exc()}"))
        raise


def _build(role: str, opts: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    import torch
    from random_model import random_checkpoint

    from pd_runtime import kvcache
    from pd_runtime.engine.core import engine_from_checkpoint, rank_spec_for
    from pd_runtime.engine.pd import DecodeSide, PrefillSide, engine_factors
    from pd_runtime.worker import PrefillRank

    dev = opts["device"]
    if dev == "cuda":
        torch.cuda.set_device(0)
    sys.setswitchinterval(opts["switch_interval_us"] / 1e6)  # as pd-runtime serve
    t0 = time.perf_counter()
    tp_size, tp_rank = tp_of(role, opts)
    group = None
    if tp_size > 1:  # every D rank on this one device: gloo (PD_RUNTIME_TP_BACKEND, see driver)
        from pd_runtime.engine.dist import backend_for, init_tp
        from pd_runtime.engine.tp_worker import GROUP_TIMEOUT_S

        group = init_tp(tp_rank, tp_size, opts["tp_init"], dev, timeout_s=GROUP_TIMEOUT_S)
    ckpt = random_checkpoint(opts["geometry"], dev, opts["seed"])
    spec = rank_spec_for(ckpt.config, block_size=opts["block_size"], layout=opts["layout"],
                         num_blocks=opts["num_blocks"], tp_size=tp_size, tp_rank=tp_rank)
    eng = engine_from_checkpoint(ckpt, spec, device=dev, seed=0, group=group,
                                 max_num_seqs=opts["max_num_seqs"],
                                 max_num_batched_tokens=opts["max_num_batched_tokens"])
    assert eng.arena is not None  # engine_from_checkpoint always builds one
    factors = engine_factors(ckpt.config, f"random-{opts['geometry']}")
    token = opts["token"]
    arena_bytes = kvcache.arena_layout(spec).nbytes
    # P's staging and D's receive buffer: sized to the largest request, not to the arena (as
    # make_prefill_side and DecodeRank do by default), so that 32k x 8 fits beside two arenas
    # on one card. D pulls one request at a time; P's staging holds two by default (a slot is
    # freed when D's READ notification arrives, possibly after the next PREPARE); more lets P
    # gather at hold() for the requests D has not pulled yet (worker.py: stage at hold).
    req_bytes = kvcache.kv_bytes_per_token(spec) * opts["max_request_tokens"] + (1 << 20)
    if role == "prefill":
        rank = PrefillRank(spec, factors, token.encode(), dev, lease_s=opts["lease_s"],
                           host="127.0.0.1", port=0, arena=eng.arena,
                           staging_bytes=min(opts["p_staging_requests"] * req_bytes,
                                             2 * arena_bytes + (1 << 20)))
        eng.prefill = PrefillSide([rank], uuid.uuid4().hex, "127.0.0.1", rank.address[1], 1,
                                  spec.block_size)
    elif role == "decode":
        eng.decode = DecodeSide(spec, factors, token, eng.arena, dev, opts["pull_timeout_s"],
                                recv_bytes=min(req_bytes, arena_bytes + (1 << 16)))
    if dev == "cuda":
        torch.cuda.synchronize()
    info = {"role": role, "pid": os.getpid(), "build_s": round(time.perf_counter() - t0, 2),
            "arena_bytes": arena_bytes, "num_blocks": spec.num_blocks,
            "kv_bytes_per_token": kvcache.kv_bytes_per_token(spec)}
    if group is not None:
        import torch.distributed as dist

        dist.barrier()  # every rank built its runner
        info.update({"tp_rank": tp_rank, "tp_size": tp_size, "tp_backend": backend_for(dev),
                     "kv_heads": list(eng.runner.model.kv_heads)})
    if dev == "cuda":
        info["gpu_mem_allocated_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    return eng, ckpt, info


def tp_of(role: str, opts: dict[str, Any]) -> tuple[int, int]:
    """(TP size, TP rank) of this process: D may have several ranks, P and aggregated one."""
    if role != "decode":
        return 1, 0
    return int(opts.get("d_tp", 1)), int(opts.get("tp_rank", 0))


def _pull_stats() -> dict[str, dict[str, Any]]:
    """Wrap worker.DecodeRank.pull in this process: each pull's PullStats (PREPARE round trip,
    P's gather, READ, scatter) lands in the returned dict, keyed by transfer id."""
    from pd_runtime import worker

    stats: dict[str, dict[str, Any]] = {}
    orig = worker.DecodeRank.pull

    def rank_pull(self: Any, req_id: str, p_req: Any, d_req: Any) -> Any:
        st = orig(self, req_id, p_req, d_req)
        stats[req_id] = dataclasses.asdict(st)
        return st

    worker.DecodeRank.pull = rank_pull  # type: ignore[method-assign]
    return stats


def _time_pulls(side: Any, stats: dict[str, dict[str, Any]], log: dict[str, dict[str, Any]],
                by_transfer: dict[str, str] | None = None) -> None:
    """Wrap `side.pull`: each pull's wall time, bytes (what the side returns) and the PullStats
    `stats` holds for its transfer id (popped: with TP the inner, per-rank wrapper takes them)
    go to `log`, keyed by the request id `by_transfer` maps the transfer id to (else by it)."""
    orig = side.pull
    names = by_transfer if by_transfer is not None else {}

    def pull(p: Any, d_req: Any) -> int:
        t0 = time.perf_counter()
        n = 0
        try:
            n = int(orig(p, d_req))
            return n
        finally:
            t1 = time.perf_counter()
            tid = p.remote_request_id
            log[names.get(tid, tid)] = {"t_start": t0, "t_end": t1, "wall_s": t1 - t0,
                                        "bytes": n, **stats.pop(tid, {})}

    side.pull = pull


def _instrument_decode(eng: Any, pulls: dict[str, dict[str, Any]],
                       by_transfer: dict[str, str],
                       rank_log: dict[str, dict[str, Any]] | None = None) -> None:
    """Record D's pulls: wall time around DecodeSide.pull (what the engine waits for) and the
    transfer engine's own PullStats (worker.DecodeRank.pull). With TP (`rank_log`), eng.decode
    is a TPDecodeSide: its wall time is the whole pull (every rank's); this rank's own pull
    and PullStats go to `rank_log`."""
    stats = _pull_stats()
    side = eng.decode
    if rank_log is not None:  # this rank's own pulls (its DecodeSide inside TPDecodeSide)
        _time_pulls(side.local, stats, rank_log)
    # bytes: what the side returns (with TP, every rank's); PullStats' own (TP 1) wins
    _time_pulls(side, stats, pulls, by_transfer)


def _serve(conn: Connection, role: str, opts: dict[str, Any]) -> None:
    import torch

    from pd_runtime.engine.sampling import SamplingParams

    eng, ckpt, info = _build(role, opts)
    tp_size, tp_rank = tp_of(role, opts)
    if tp_rank > 0:
        _serve_rank(conn, eng, info)
        return
    prompts: dict[str, list[int]] = {}
    pulls: dict[str, dict[str, Any]] = {}
    added: dict[str, float] = {}
    by_transfer: dict[str, str] = {}
    rank_log: dict[str, dict[str, Any]] | None = None
    if tp_size > 1:  # rank 0 of D: orders to every rank, as tp_worker.build_tp_engine wraps it
        from pd_runtime.engine.tp_worker import TPDecodeSide, TPGroup, TPRunner

        group = TPGroup([])  # the other ranks are the driver's processes, not this one's
        eng.runner = TPRunner(eng.runner, group)
        eng.decode = TPDecodeSide(eng.decode, group)
        rank_log = {}
    if role == "decode":
        _instrument_decode(eng, pulls, by_transfer, rank_log)
    vocab = ckpt.config.vocab_size
    conn.send(("ready", info))
    while True:
        busy = eng.has_unfinished()
        if not busy:
            # idle: wait for the driver; P keeps stepping while it holds blocks for D, so the
            # blocks D has released are freed (as AsyncEngine's loop does)
            if not conn.poll(0.002 if eng.held else 0.05):
                if eng.held:
                    eng.step()
                eng.tick()  # TP: a no-op order now and then keeps the other ranks in the group
                continue
        while conn.poll():
            msg = conn.recv()
            op = msg[0]
            if op == "prep":
                _, rid, seed, length = msg
                g = torch.Generator().manual_seed(seed)
                prompts[rid] = torch.randint(2, vocab, (length,), generator=g).tolist()
            elif op == "add":
                _, rid, max_tokens, kv = msg
                added[rid] = time.perf_counter()
                if kv is not None and kv.get("remote_request_id"):
                    by_transfer[kv["remote_request_id"]] = rid
                params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens,
                                        temperature=0, ignore_eos=True)
                try:
                    eng.add_request(rid, prompts.pop(rid), params, kv)
                except Exception as e:  # noqa: BLE001 - reported to the driver, named
                    conn.send(("outs", time.perf_counter(),
                               [(rid, 0, True, None, f"{type(e).__name__}: {e}")]))
            elif op == "log":
                conn.send(("log", {"pulls": dict(pulls), "added": dict(added),
                                   "rank_pulls": dict(rank_log or {})}))
                pulls.clear()
                added.clear()
                if rank_log is not None:
                    rank_log.clear()
            elif op == "stats":
                conn.send(("stats", eng.snapshot()))
            elif op == "prefill_bench":
                from prefill_bench import prefill_bench

                conn.send(("prefill_bench", prefill_bench(eng, ckpt, opts, msg[1])))
            elif op == "stop":
                for side in (eng.prefill, eng.decode):
                    if side is not None:
                        side.close()
                eng.close()
                close = getattr(eng.runner, "close", None)
                if close is not None:  # TP: the stop order to the other ranks, the group's end
                    close()
                conn.send(("stopped", None))
                return
        if eng.has_unfinished() or eng.held:
            outs = eng.step()
            if outs:
                t = time.perf_counter()
                conn.send(("outs", t, [(o.request_id, len(o.token_ids), o.finished,
                                        o.kv_transfer_params,
                                        None if o.error is None else repr(o.error))
                                       for o in outs]))


def _serve_rank(conn: Connection, eng: Any, info: dict[str, Any]) -> None:
    """D rank 1..N-1: rank 0's orders on this thread (tp_worker.serve_orders, until rank 0's stop
    order); the driver's ("log",) answered from another, with this rank's pulls so far."""
    from pd_runtime.engine.dist import shutdown_tp
    from pd_runtime.engine.tp_worker import serve_orders

    log: dict[str, dict[str, Any]] = {}
    _time_pulls(eng.decode, _pull_stats(), log)
    send_lock = threading.Lock()

    def answer() -> None:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return
            if msg[0] == "log":
                snap = dict(log)
                with send_lock:
                    conn.send(("log", {"rank_pulls": snap}))
                for k in snap:
                    log.pop(k, None)
            # ("stop",): answered below, once rank 0's stop order has ended the order loop

    conn.send(("ready", info))
    threading.Thread(target=answer, daemon=True, name="e2e-rank-log").start()
    serve_orders(eng)
    shutdown_tp()
    with send_lock:
        conn.send(("stopped", None))
