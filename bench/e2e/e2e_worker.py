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
"""

from __future__ import annotations

import dataclasses
import os
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
    t0 = time.perf_counter()
    ckpt = random_checkpoint(opts["geometry"], dev, opts["seed"])
    spec = rank_spec_for(ckpt.config, block_size=opts["block_size"], layout=opts["layout"],
                         num_blocks=opts["num_blocks"])
    eng = engine_from_checkpoint(ckpt, spec, device=dev, seed=0,
                                 max_num_seqs=opts["max_num_seqs"],
                                 max_num_batched_tokens=opts["max_num_batched_tokens"])
    assert eng.arena is not None  # engine_from_checkpoint always builds one
    factors = engine_factors(ckpt.config, f"random-{opts['geometry']}")
    token = opts["token"]
    arena_bytes = kvcache.arena_layout(spec).nbytes
    if role == "prefill":
        # as make_prefill_side, with the staging region sized to the arena (not twice it): D
        # pulls one request at a time and P frees a slot as soon as D has read it
        rank = PrefillRank(spec, factors, token.encode(), dev, lease_s=opts["lease_s"],
                           host="127.0.0.1", port=0, arena=eng.arena,
                           staging_bytes=arena_bytes + (1 << 20))
        eng.prefill = PrefillSide([rank], uuid.uuid4().hex, "127.0.0.1", rank.address[1], 1,
                                  spec.block_size)
    elif role == "decode":
        eng.decode = DecodeSide(spec, factors, token, eng.arena, dev, opts["pull_timeout_s"])
    if dev == "cuda":
        torch.cuda.synchronize()
    info = {"role": role, "pid": os.getpid(), "build_s": round(time.perf_counter() - t0, 2),
            "arena_bytes": arena_bytes, "num_blocks": spec.num_blocks,
            "kv_bytes_per_token": kvcache.kv_bytes_per_token(spec)}
    if dev == "cuda":
        info["gpu_mem_allocated_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    return eng, ckpt, info


def _instrument_decode(eng: Any, pulls: dict[str, dict[str, Any]],
                       by_transfer: dict[str, str]) -> None:
    """Record D's pulls: wall time around DecodeSide.pull (what the engine waits for) and the
    transfer engine's own PullStats (worker.DecodeRank.pull)."""
    from pd_runtime import worker

    stats: dict[str, dict[str, Any]] = {}
    orig_rank_pull = worker.DecodeRank.pull

    def rank_pull(self: Any, req_id: str, p_req: Any, d_req: Any) -> Any:
        st = orig_rank_pull(self, req_id, p_req, d_req)
        stats[req_id] = dataclasses.asdict(st)
        return st

    worker.DecodeRank.pull = rank_pull  # type: ignore[method-assign]
    side = eng.decode
    orig_pull = side.pull

    def pull(p: Any, d_req: Any) -> int:
        t0 = time.perf_counter()
        try:
            return int(orig_pull(p, d_req))
        finally:
            t1 = time.perf_counter()
            rid = by_transfer.get(p.remote_request_id, p.remote_request_id)
            pulls[rid] = {"t_start": t0, "t_end": t1, "wall_s": t1 - t0,
                          **stats.pop(p.remote_request_id, {})}

    side.pull = pull


def _serve(conn: Connection, role: str, opts: dict[str, Any]) -> None:
    import torch

    from pd_runtime.engine.sampling import SamplingParams

    eng, ckpt, info = _build(role, opts)
    prompts: dict[str, list[int]] = {}
    pulls: dict[str, dict[str, Any]] = {}
    added: dict[str, float] = {}
    by_transfer: dict[str, str] = {}
    if role == "decode":
        _instrument_decode(eng, pulls, by_transfer)
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
                conn.send(("log", {"pulls": dict(pulls), "added": dict(added)}))
                pulls.clear()
                added.clear()
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
