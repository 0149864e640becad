"""AsyncEngine: LLMEngine's step loop on a background thread, one asyncio queue per request.

The loop thread owns the LLMEngine (it is not thread-safe): the event loop hands it commands
(add, abort) through a thread-safe queue and gets Outputs back with call_soon_threadsafe. A
request whose consumer goes away (client disconnect: the async generator is closed or
cancelled) is aborted. If the loop itself fails, every request gets EngineDead.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import kvcache
from .core import LLMEngine, Output
from .errors import DuplicateRequest, EngineDead, EngineError
from .sampling import SamplingParams

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ROLES = ("prefill", "decode", "aggregated")
DEFAULT_KV_MEMORY = {"cpu": 256 << 20, "cuda": 4 << 30}
MAX_BLOCKS = 1 << 16
IDLE_WAIT_S = 0.05
HELD_POLL_S = 0.01  # while P holds blocks for D, step this often to free released ones


@dataclass
class EngineArgs:
    """What `pd-runtime serve` passes (the rendered flags, ENGINE_PLAN.md Changes: SERVE)."""

    model: str  # local checkpoint: a directory (config.json + safetensors) or a .gguf file
    role: str = "aggregated"  # prefill | decode | aggregated
    served_model_name: str | None = None
    family: str | None = None
    dtype: str | None = None
    tensor_parallel_size: int = 1
    block_size: int = 16
    kv_cache_dtype: str = "auto"
    kv_cache_layout: str = "HND"
    connector: str = "NixlConnector"
    backends: list[str] = field(default_factory=lambda: ["UCX"])
    buffer_device: str = "cpu"
    side_channel_host: str = "127.0.0.1"
    side_channel_port: int = 5600
    token_file: str | None = None
    device: str = "cpu"
    num_blocks: int | None = None
    kv_cache_memory: int | None = None  # bytes per rank for the KV arena
    max_model_len: int | None = None
    # engine knobs (not rendered; defaults serve well)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    lease_s: float = 120.0
    kv_pull_timeout_s: float = 30.0
    seed: int | None = None
    token: str | None = None  # the side-channel secret itself (tests); else token_file / env

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be >= 1")
        if self.connector not in ("NixlConnector",) and self.role != "aggregated":
            raise ValueError(f"connector {self.connector!r}: the builtin engine pulls "
                             "(NixlConnector)")


def _num_blocks(args: EngineArgs, probe: kvcache.RankSpec) -> int:
    if args.num_blocks:
        return args.num_blocks
    mem = args.kv_cache_memory or DEFAULT_KV_MEMORY.get(args.device, DEFAULT_KV_MEMORY["cpu"])
    per_block = max(1, kvcache.kv_bytes_per_token(probe) * probe.block_size)
    return max(2, min(MAX_BLOCKS, mem // per_block))


def state_slots(args: EngineArgs) -> int:
    """SSM state slots (hybrid-ssm): one per running sequence, and spares for P's scratch slots
    (admission control waits when they run out)."""
    return args.max_num_seqs + 8


def _token(args: EngineArgs) -> bytes:
    from ..handshake import load_token

    if args.token is not None:
        return load_token(args.token)
    if args.token_file:
        with open(args.token_file, "rb") as f:
            return load_token(f.read().strip())
    return load_token()


def attach_pd_side(eng: LLMEngine, args: EngineArgs, config: Any, spec: kvcache.RankSpec,
                   arena: torch.Tensor, device: str) -> None:
    """Give a prefill or decode rank's engine its P/D side over `arena` (aggregated: none)."""
    from .pd import DecodeSide, engine_factors, make_prefill_side

    if args.role == "aggregated":
        return
    factors = engine_factors(config, args.served_model_name or args.model, args.kv_cache_dtype)
    token = _token(args)
    if args.role == "prefill":
        eng.prefill = make_prefill_side(spec, factors, token, arena,
                                        host=args.side_channel_host,
                                        port=args.side_channel_port, lease_s=args.lease_s,
                                        device=device)
    else:
        eng.decode = DecodeSide(spec, factors, token, arena, device, args.kv_pull_timeout_s)


def build_engine(args: EngineArgs) -> tuple[LLMEngine, Any]:
    """Load the model and build the engine for rank 0 (and its P/D side); (engine, checkpoint)."""
    from .checkpoint import load_checkpoint
    from .core import engine_from_checkpoint, rank_spec_for

    if args.tensor_parallel_size > 1:
        from .tp_worker import build_tp_engine

        return build_tp_engine(args)
    ckpt = load_checkpoint(args.model, dtype=args.dtype)
    geo = dict(block_size=args.block_size, layout=args.kv_cache_layout,
               cache_dtype=args.kv_cache_dtype)
    spec = rank_spec_for(ckpt.config, num_blocks=_num_blocks(args, rank_spec_for(
        ckpt.config, num_blocks=1, **geo)), num_state_slots=state_slots(args), **geo)
    eng = engine_from_checkpoint(ckpt, spec, device=args.device,
                                 max_model_len=args.max_model_len, seed=args.seed,
                                 max_num_seqs=args.max_num_seqs,
                                 max_num_batched_tokens=args.max_num_batched_tokens)
    assert eng.arena is not None
    attach_pd_side(eng, args, ckpt.config, spec, eng.arena, args.device)
    return eng, ckpt


class AsyncEngine:
    def __init__(self, engine: LLMEngine, *, tokenizer: Any = None, model_name: str = "model"):
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = engine.max_model_len
        self._cmds: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._dead: EngineError | None = None
        self._stats: dict[str, Any] = engine.snapshot()
        self._thread = threading.Thread(target=self._loop, name="engine-step", daemon=True)
        self._thread.start()

    @classmethod
    async def start(cls, args: EngineArgs) -> AsyncEngine:
        """Load the model (in a worker thread: the event loop keeps serving /health)."""
        eng, ckpt = await asyncio.to_thread(build_engine, args)
        return cls(eng, tokenizer=ckpt.tokenizer,
                   model_name=args.served_model_name or args.model)

    # ---- the client side (event loop) -----------------------------------------------------

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       kv_transfer_params: dict | None = None) -> AsyncIterator[Output]:
        if self._dead is not None:
            raise self._dead
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request_id in self._queues:
                raise DuplicateRequest(f"request id {request_id!r} is already running")
            self._queues[request_id] = (asyncio.get_running_loop(), q)
        self._send("add", (request_id, list(prompt_ids), params, kv_transfer_params))
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.error is not None:
                    finished = True
                    raise item.error
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            with self._lock:
                self._queues.pop(request_id, None)
            if not finished:
                self._send("abort", request_id)

    async def abort(self, request_id: str) -> None:
        self._send("abort", request_id)

    def stats(self) -> dict:
        return dict(self._stats)

    async def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        await asyncio.to_thread(self._thread.join, 10.0)
        if self._dead is None:
            self._dead = EngineDead("the engine is shutting down")
        with self._lock:
            ids = list(self._queues)
        for rid in ids:  # nobody waits forever on a stopped loop
            self._deliver(rid, self._dead)
        await asyncio.to_thread(self._close_sides)

    def _close_sides(self) -> None:
        self.engine.close()
        for side in (self.engine.prefill, self.engine.decode):
            if side is not None:
                try:
                    side.close()
                except Exception:  # noqa: BLE001 - shutting down anyway
                    log.exception("closing the KV transfer side failed")
        close = getattr(self.engine.runner, "close", None)
        if close is not None:
            close()

    def _send(self, op: str, arg: Any) -> None:
        self._cmds.put((op, arg))
        self._wake.set()

    def _deliver(self, request_id: str, item: Output | BaseException) -> None:
        with self._lock:
            entry = self._queues.get(request_id)
        if entry is not None:
            loop, q = entry
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody listens any more
                pass

    # ---- the loop thread ------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._stop:
                self._apply_commands()
                eng = self.engine
                if not eng.has_unfinished():
                    self._stats = self._snapshot()
                    self._wake.wait(HELD_POLL_S if eng.held else IDLE_WAIT_S)
                    self._wake.clear()
                    if eng.held:
                        eng.step()  # reaps blocks D has released or whose lease expired
                    eng.tick()
                    continue
                outs = eng.step()
                self._stats = self._snapshot()  # before the outputs: a client sees fresh stats
                for out in outs:
                    self._deliver(out.request_id, out)
        except Exception as e:  # noqa: BLE001 - the engine is dead; tell everyone, named
            log.exception("engine step loop failed")
            self._dead = EngineDead(f"the engine stopped: {type(e).__name__}: {e}")
            with self._lock:
                ids = list(self._queues)
            for rid in ids:
                self._deliver(rid, self._dead)

    def _apply_commands(self) -> None:
        while True:
            try:
                op, arg = self._cmds.get_nowait()
            except queue.Empty:
                return
            if op == "add":
                rid, prompt, params, kv = arg
                try:
                    self.engine.add_request(rid, prompt, params, kv)
                except EngineError as e:
                    self._deliver(rid, e)
            elif op == "abort":
                self.engine.abort(arg)

    def _snapshot(self) -> dict:
        s = self.engine.snapshot()
        b = self.engine.blocks
        s["free_blocks"] = min((p.num_free for p in b.pools.values()), default=0)
        s["total_blocks"] = self.engine.spec.num_blocks
        s["held_blocks"] = sum(sum(1 for i in t if i >= 0) for k in self.engine.held
                               for t in b.seqs[k].tables.values())
        s["updated"] = time.time()
        return s
