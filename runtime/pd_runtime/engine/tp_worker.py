"""Tensor parallelism across the processes of one pod.

Rank 0 runs the scheduler (LLMEngine) and starts ranks 1..N-1 as processes of this module.
Every rank holds its own KV arena (its heads, kvcache.heads_of_rank), its own ModelRunner over
the TP group (torch.distributed: gloo on CPU, NCCL on CUDA; PD_RUNTIME_TP_BACKEND=gloo for
several ranks on one GPU, engine/dist.py) and, with P/D, its own PrefillRank
(side channel on base port + rank) or DecodeRank connections. Rank 0 broadcasts each order over
the group, in the one order every rank then executes it:

    ("exec", batch)       the step's SeqChunks: every rank runs the forward (all_reduce inside)
    ("pull", params, req) D: every rank pulls its slice; results gathered on rank 0
    ("hold", tid, req)    P: every rank holds the request's blocks for D
    ("held",)             P: each rank's still-held transfer ids, gathered on rank 0
    ("noop",)             keeps idle ranks inside the group's timeout
    ("stop",)

Block ids are the same on every rank (one allocator, on rank 0, over equal block counts). A
worker exits when rank 0 goes away (the collective fails, or its parent process is gone).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace
from typing import Any

import torch
import torch.distributed as dist

from .errors import KVPullFailed
from .pd import DecodeKVParams, DecodeSide, PDStats, PrefillSide

log = logging.getLogger(__name__)
HEARTBEAT_S = 2.0
GROUP_TIMEOUT_S = 300.0


def _bcast(msg: Any = None) -> Any:
    box = [msg]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(obj: Any) -> list[Any] | None:
    """Gather to rank 0 (list there, None elsewhere)."""
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


class TPGroup:
    """Rank 0's end of the group: sends orders, runs its own share, collects results."""

    def __init__(self, procs: list[subprocess.Popen]):
        self.procs = procs
        self.lock = threading.Lock()  # orders from the loop thread and from shutdown
        self.last = time.monotonic()
        self.closed = False

    def order(self, msg: tuple) -> None:
        self.last = time.monotonic()
        _bcast(msg)

    def tick(self) -> None:
        if time.monotonic() - self.last > HEARTBEAT_S:
            with self.lock:
                self.order(("noop",))

    def close(self, timeout: float = 10.0) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            with self.lock:
                self.order(("stop",))
        except Exception:  # noqa: BLE001 - a worker already gone; stop the rest below
            log.warning("TP stop order failed; terminating workers")
        end = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        from .dist import shutdown_tp

        shutdown_tp()


class TPRunner:
    """Rank 0's runner: orders the step to every rank, then runs its own share."""

    def __init__(self, local: Any, group: TPGroup):
        self.local, self.group = local, group

    def execute(self, batch: list) -> torch.Tensor:
        with self.group.lock:
            self.group.order(("exec", batch))
            return self.local.execute(batch)

    def tick(self) -> None:
        self.group.tick()

    def close(self) -> None:
        self.group.close()


class TPDecodeSide:
    """D with TP: every rank pulls its slice into its own arena; any failure fails the pull.
    Synchronous: the orders share the group with the steps, in one order."""

    asynchronous = False

    def __init__(self, local: DecodeSide, group: TPGroup):
        self.local, self.group = local, group
        self.stats = PDStats()

    def pull(self, p: DecodeKVParams, d_req: Any) -> int:
        with self.group.lock:
            self.group.order(("pull", p, d_req))
            results = _gather(_pull_result(self.local, p, d_req)) or []
        errors = [f"rank {r}: {res}" for r, res in enumerate(results) if isinstance(res, str)]
        if errors:
            self.stats.kv_pull_failures += 1
            raise KVPullFailed("; ".join(errors))
        nbytes = sum(int(r) for r in results)
        self.stats.kv_pulls += 1
        self.stats.kv_pull_bytes += nbytes
        return nbytes

    def lease_s(self) -> float | None:
        return self.local.lease_s()

    def heartbeat(self, params: list[DecodeKVParams]) -> int:
        return self.local.heartbeat(params)  # rank 0 is connected to every P rank

    def close(self) -> None:
        self.local.close()


def _pull_result(side: DecodeSide, p: DecodeKVParams, d_req: Any) -> int | str:
    try:
        return side.pull(p, d_req)
    except KVPullFailed as e:
        return e.message


def tp_prefill_side(local: PrefillSide, group: TPGroup) -> PrefillSide:
    """P with TP: holds go to every rank; a hold ends when no rank still holds it."""

    def hold_remote(tid: str, req: Any) -> None:
        with group.lock:
            group.order(("hold", tid, req))

    def remote_held() -> set[str]:
        with group.lock:
            group.order(("held",))
            parts = _gather(set()) or []
        return set().union(*parts)

    local.hold_remote = hold_remote
    local.remote_held = remote_held
    return local


# ---------------------------------------------------------------------------- rank 0

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_tp_engine(args: Any) -> tuple[Any, Any]:
    """Rank 0: start the workers, join the group, build the engine around TPRunner."""
    from .async_engine import _num_blocks
    from .checkpoint import load_checkpoint
    from .core import rank_spec_for
    from .dist import init_tp

    size = args.tensor_parallel_size
    ckpt = load_checkpoint(args.model, dtype=args.dtype)
    geo = dict(block_size=args.block_size, layout=args.kv_cache_layout,
               cache_dtype=args.kv_cache_dtype, tp_size=size)
    nb = _num_blocks(args, rank_spec_for(ckpt.config, num_blocks=1, **geo))
    args = replace(args, num_blocks=nb)
    init = f"tcp://127.0.0.1:{_free_port()}"
    procs = []
    for r in range(1, size):
        p = subprocess.Popen([sys.executable, "-m", "pd_runtime.engine.tp_worker", "--rank",
                              str(r), "--size", str(size), "--init", init],
                             stdin=subprocess.PIPE, start_new_session=False)
        assert p.stdin is not None
        p.stdin.write(json.dumps(asdict(args)).encode())
        p.stdin.close()
        procs.append(p)
    try:
        tp = init_tp(0, size, init, args.device, timeout_s=GROUP_TIMEOUT_S)
        group = TPGroup(procs)
        eng = _build_rank(args, ckpt, 0, tp)
        dist.barrier()  # every rank built its runner (and side channel)
    except BaseException:
        for p in procs:
            p.kill()
            p.wait(5)
        raise
    eng.runner = TPRunner(eng.runner, group)
    if eng.decode is not None:
        eng.decode = TPDecodeSide(eng.decode, group)  # type: ignore[assignment]
    if eng.prefill is not None:
        eng.prefill = tp_prefill_side(eng.prefill, group)
    return eng, ckpt


def _build_rank(args: Any, ckpt: Any, rank: int, group: Any) -> Any:
    """The engine pieces of one rank (rank 0 also schedules with it)."""
    from .async_engine import attach_pd_side, state_slots
    from .core import engine_from_checkpoint, rank_spec_for

    device = args.device
    if device.startswith("cuda"):
        torch.cuda.set_device(rank % torch.cuda.device_count())
        device = f"cuda:{torch.cuda.current_device()}"
    spec = rank_spec_for(ckpt.config, block_size=args.block_size, layout=args.kv_cache_layout,
                         cache_dtype=args.kv_cache_dtype, num_blocks=args.num_blocks,
                         tp_size=args.tensor_parallel_size, tp_rank=rank,
                         num_state_slots=state_slots(args))
    eng = engine_from_checkpoint(ckpt, spec, device=device, group=group,
                                 max_model_len=args.max_model_len, seed=args.seed,
                                 max_num_seqs=args.max_num_seqs,
                                 max_num_batched_tokens=args.max_num_batched_tokens)
    attach_pd_side(eng, args, ckpt.config, spec, eng.arena, device)
    return eng


# ---------------------------------------------------------------------------- ranks 1..N-1

def _hold(side: PrefillSide, tid: str, req: Any) -> None:
    try:
        for r in side.ranks:
            r.hold(tid, req)
    except Exception:  # noqa: BLE001 - D's pull from this rank fails, named, on the D side
        log.exception("hold of %s failed", tid)


def _watch_parent() -> None:
    parent = os.getppid()
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(3)


def worker_main(rank: int, size: int, init: str, args: Any) -> int:
    from .checkpoint import load_checkpoint
    from .dist import init_tp

    threading.Thread(target=_watch_parent, daemon=True).start()
    group = init_tp(rank, size, init, args.device, timeout_s=GROUP_TIMEOUT_S)
    eng = _build_rank(args, load_checkpoint(args.model, dtype=args.dtype), rank, group)
    dist.barrier()
    return serve_orders(eng)


def serve_orders(eng: Any) -> int:
    """Ranks 1..N-1: execute rank 0's orders until "stop" (0), closing this rank's P/D sides
    on the way out. `eng` is this rank's engine, built over the group (its scheduler unused)."""
    try:
        while True:
            msg = _bcast()
            op = msg[0]
            if op == "exec":
                eng.runner.execute(msg[1])
            elif op == "pull":
                _gather(_pull_result(eng.decode, msg[1], msg[2]))
            elif op == "hold":
                _hold(eng.prefill, msg[1], msg[2])
            elif op == "held":
                _gather({t for r in eng.prefill.ranks for t in r.requests})
            elif op == "stop":
                return 0
    finally:
        for side in (eng.prefill, eng.decode):
            if side is not None:
                side.close()


def main(argv: list[str] | None = None) -> int:
    from .async_engine import EngineArgs

    ap = argparse.ArgumentParser(description="pd-runtime TP worker (started by rank 0)")
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--init", required=True)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tp{a.rank} %(message)s")
    args = EngineArgs(**json.loads(sys.stdin.read()))
    try:
        return worker_main(a.rank, a.size, a.init, args)
    except Exception as e:  # noqa: BLE001 - a worker that fails says why, in one line
        log.error("TP rank %d failed: %s: %s", a.rank, type(e).__name__, e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
