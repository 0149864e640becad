"""Prefill and decode ranks: the handshake, the gather on P, one READ per peer, the scatter on D.

Per request: D checks its block tables against the cached pair templates (template.py), sends
PREPARE to every P rank it reads from (one round trip for all) and uploads its tables while P
answers, P gathers into a staging slot with the template kernel, D posts one READ per peer and
scatters. Nothing is planned per request; the planner (planner.py) is the reference the
templates are tested against.

P gathers at hold() already, for every decode geometry connected at that moment (stage at hold):
the gather then overlaps P's answer, the router and D's queue instead of sitting inside the
PREPARE round trip, and PREPARE only claims the slot (waiting for the gather if it has not
ended). "Connected" means an open side-channel session: the server closes one after its idle
timeout and D reconnects at its next pull, so after a quiet spell the first requests are
gathered at PREPARE again. A geometry that connects later, or a request that does not fit the
half of the staging region staging may use, is gathered at PREPARE as before. On by default on
CUDA only (stage_at_hold_default); PD_RUNTIME_STAGE_AT_HOLD=0 keeps the previous path, to
measure against.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .compat.hashing import differing_factors, hash_factors
from .handshake import (
    ChannelLimits,
    Session,
    SideChannelClient,
    SideChannelServer,
    compare_hash,
    require_token,
)
from .kernels.kvcopy import (
    on_stream,
    program_for,
    queued_work,
    transfer_stream,
    upload_all,
    wait_device,
)
from .kvcache import GeometryError, RankSpec, arena_layout
from .lease import LeaseError, LeaseTable, StagingFull, consumer_id
from .planner import PlanError, Request, expected_consumers
from .protocol import (
    HandshakeError,
    HashMismatch,
    MetaReply,
    MetaRequest,
    NotConnected,
    PatternRequest,
    PrepareReply,
    PrepareRequest,
    ProtocolError,
    Refusal,
    StagingRegion,
    UnexpectedMessage,
    WireRequest,
)
from .switches import env_choice
from .template import TemplateCache, as_table
from .transport import TransferError, Transport

__all__ = ["PrefillRank", "DecodeRank", "PullStats", "TransferError", "HandshakeError",
           "LeaseError", "req_to_wire", "req_from_wire"]

log = logging.getLogger(__name__)
OnRelease = Callable[[str, str], None]


def _packed(bts: dict) -> dict[int, bytes]:
    """Block tables as little-endian int64 bytes (the wire form: one C-level copy, not a Python
    int per block; the receiver compares bytes)."""
    return {int(g): as_table(bt, f"block table of group {g}").astype("<i8", copy=False).tobytes()
            for g, bt in bts.items()}


def req_to_wire(r: Request) -> WireRequest:
    return WireRequest(r.num_tokens, _packed(r.block_tables))


def req_from_wire(w: WireRequest) -> Request:
    tabs = {}
    for g, b in w.block_tables.items():
        if len(b) % 8:
            raise ProtocolError(f"block table of group {g}: {len(b)} bytes, not whole int64s")
        tabs[g] = np.frombuffer(b, "<i8").tolist()
    return Request(w.num_tokens, tabs)


@dataclass(frozen=True)
class _Held:
    """A held request as the gather uses it: int64 tables, their wire form (None when they are
    not integers: refused at PREPARE, as before), and on CUDA the event after the kernels that
    wrote its KV (a gather on P's own stream waits for that, not for what came after)."""

    req: Request
    packed: dict[int, bytes] | None
    written: torch.cuda.Event | None = None


def _held(req: Request, written: torch.cuda.Event | None) -> _Held:
    try:
        arrays = {g: as_table(bt) for g, bt in req.block_tables.items()}
        return _Held(Request(req.num_tokens, arrays), _packed(arrays), written)  # type: ignore[arg-type]
    except PlanError:
        return _Held(req, None, written)


def _arrays(req: Request) -> Request:
    """`req` with int64 tables (converted once per pull, not once per peer)."""
    return Request(req.num_tokens, {g: as_table(bt, f"decode: block table of group {g}")  # type: ignore[misc]
                                    for g, bt in req.block_tables.items()})


def stage_at_hold_default(device: str) -> bool:
    """PD_RUNTIME_STAGE_AT_HOLD: 1 gathers at hold(), 0 only at PREPARE; unset (or `auto`): on
    CUDA only. There hold() only queues the gather; on the CPU it would copy on the engine's
    thread, where P's next prefill waits for it (at PREPARE it runs beside the engine)."""
    raw = env_choice("PD_RUNTIME_STAGE_AT_HOLD", ("0", "1", "auto"), "auto")
    return str(device).startswith("cuda") if raw == "auto" else raw == "1"


def _check_req_id(req_id: str) -> None:
    if not req_id or len(req_id) > 256 or ":" in req_id or "," in req_id:
        raise ValueError(f"request id {req_id[:40]!r}: 1-256 characters, no ':' or ','")


def _check_in_staging(p_rank: int, rep: PrepareReply, staging: StagingRegion) -> None:
    """The slot a prefill rank names lies inside the staging region it registered."""
    if (rep.dev != staging.dev or rep.addr < staging.addr
            or rep.addr + rep.nbytes > staging.addr + staging.nbytes):
        raise ProtocolError(f"prefill rank {p_rank} named a slot outside its staging region")


@dataclass(frozen=True)
class _Consumer:
    """What the prefill side knows about the decode rank at the other end of a connection."""

    agent: str
    spec: RankSpec


class PrefillRank:
    """Serves metadata and PREPARE on the side channel; gathers into staging slots; frees a
    request's slots when all its consumers are done or its lease expires, then calls
    `on_release(req_id, "consumed" | "expired")` once, so the engine can free the request's
    blocks. It runs on a runtime thread (the notification poller, or a side-channel thread that
    found the lease expired): keep it short and thread-safe."""

    def __init__(self, spec: RankSpec, factors: dict, token: bytes, device: str = "cpu", *,
                 staging_bytes: int | None = None, lease_s: float = 30.0,
                 host: str = "127.0.0.1", port: int = 0, name: str | None = None,
                 arena: torch.Tensor | None = None, transport: Transport | None = None,
                 on_release: OnRelease | None = None, limits: ChannelLimits | None = None,
                 stage_at_hold: bool | None = None):
        """`stage_at_hold`: gather at hold() for the decode geometries connected then (module
        docstring); None reads PD_RUNTIME_STAGE_AT_HOLD."""
        token = require_token(token)  # before anything is allocated or registered
        self.stage_at_hold = (stage_at_hold_default(device) if stage_at_hold is None
                              else stage_at_hold)
        self.spec, self.device, self.factors = spec, device, factors
        self.hash = hash_factors(factors)
        nb = arena_layout(spec).nbytes
        self.arena = arena if arena is not None else torch.zeros(nb, dtype=torch.uint8, device=device)
        staging_bytes = staging_bytes or 2 * nb + (1 << 20)
        self.staging = torch.zeros(staging_bytes, dtype=torch.uint8, device=device)
        self.on_release = on_release
        self.leases = LeaseTable(staging_bytes, lease_s, on_release=self._released)
        self.requests: dict[str, Request] = {}
        self._held: dict[str, _Held] = {}  # the same requests, ready for the gather
        self.templates = TemplateCache()  # per D geometry: built once, reused for every request
        self.stream = transfer_stream(device)  # the gathers' (kernels/kvcopy.py)
        self.own_transport = transport is None
        self.transport = transport or Transport(name or f"prefill-{spec.tp_rank}-{id(self):x}", device)
        self.name = self.transport.name
        self.transport.register(self.arena)
        self.transport.register(self.staging)
        self.lock = threading.Lock()
        self._consumers: dict[RankSpec, int] = {}  # connected decode geometries: open sessions
        self._consumers_lock = threading.Lock()
        self._stage_failures = 0
        self.server = SideChannelServer(token, self._handle, host, port, limits,
                                        on_close=self._session_closed)
        self._stop = False
        self._poller = threading.Thread(target=self._poll, daemon=True)
        self._poller.start()

    @property
    def address(self) -> tuple[str, int]:
        return self.server.host, self.server.port

    def hold(self, req_id: str, req: Request) -> None:
        """A finished prefill: its blocks stay until consumed or the lease expires. Called by
        the thread that launched the prefill (its KV writes may still be queued)."""
        _check_req_id(req_id)
        if req_id in self.requests:
            raise LeaseError(f"request {req_id!r} is already held")
        self.requests[req_id] = req
        written = queued_work(self.device) if self.stream is not None else None
        held = self._held[req_id] = _held(req, written)  # tables packed once, not per PREPARE
        try:
            self.leases.hold(req_id)
        except LeaseError:
            self.requests.pop(req_id, None)
            self._held.pop(req_id, None)
            raise
        if self.stage_at_hold and held.packed is not None:
            with self._consumers_lock:
                geometries = list(self._consumers)
            try:
                self._stage(req_id, held, geometries)
            except Exception:  # noqa: BLE001 - the request is held: PREPARE gathers instead
                self._stage_failures += 1
                if self._stage_failures == 1:
                    log.exception("prefill rank %s: gather at hold() failed; gathering at "
                                  "PREPARE", self.name)

    def _stage(self, rid: str, held: _Held, geometries: list[RankSpec]) -> None:
        """Gather `rid` now for every decode rank geometry in `geometries` that reads from this
        rank, into slots PREPARE can claim; whatever stops it leaves the gather to PREPARE,
        which names errors. It only queues work on the engine's thread: the programs exist
        (built when the decode connected), and the tables of every slot go up in one copy queued
        before the wait for the request's KV. (The next upload from this thread's pinned buffer
        waits for this copy; had it been queued after that wait, it would wait for the prefill
        just launched.)"""
        T = held.req.num_tokens
        todo = []  # (geometry, program, dyn, slot offset)
        try:
            for d_spec in geometries:
                tm = self.templates.get(self.spec, d_spec)
                if tm is None or tm.nbytes(T) == 0:
                    continue
                try:
                    dyn = tm.dyn("prefill", held.req, T)
                except (PlanError, GeometryError):
                    continue
                prog = program_for(tm.gather, self.device, gather=True)  # built at meta, as a rule
                off = self.leases.stage(rid, d_spec, tm.nbytes(T),
                                        keep_free=self.staging.numel() // 2)
                if off is not None:
                    todo.append((d_spec, prog, dyn, off))
            if not todo:
                return
            with on_stream(self.stream, None):
                bts = upload_all(self.arena.device, [(dyn, off) for _, _, dyn, off in todo])
            with on_stream(self.stream, held.written):
                for (_, prog, dyn, off), bt in zip(todo, bts, strict=True):
                    prog.run(self.arena, self.staging, dyn, off, bt)
                done = queued_work(self.device)  # on this stream: after the gathers
        except BaseException:
            for d_spec, *_ in todo:
                self.leases.unstage(rid, d_spec)
            raise
        for d_spec, *_ in todo:
            self.leases.publish(rid, d_spec, done)

    def _session_closed(self, session: Session) -> None:
        if isinstance(session.context, _Consumer):
            self._forget_consumer(session.context.spec)

    def _forget_consumer(self, d_spec: RankSpec) -> None:
        with self._consumers_lock:
            n = self._consumers.get(d_spec, 0) - 1
            if n > 0:
                self._consumers[d_spec] = n
            else:
                self._consumers.pop(d_spec, None)

    def _released(self, req_id: str, reason: str) -> None:
        self.requests.pop(req_id, None)
        self._held.pop(req_id, None)
        if self.on_release is not None:
            self.on_release(req_id, reason)

    def _poll(self) -> None:
        seen: set[str] = set()
        while not self._stop:
            try:
                with self.lock:
                    notes = self.transport.notifs()
                for agent, msg in notes:
                    self.leases.handle_notif(agent, msg)
                self.leases.expire()
            except Exception as e:  # noqa: BLE001 - keep polling; say so once per kind
                if type(e).__name__ not in seen:
                    seen.add(type(e).__name__)
                    log.exception("prefill rank %s: notification poll failed", self.name)
            time.sleep(0.002)

    # -- the side channel

    def _handle(self, msg: MetaRequest | PrepareRequest | PatternRequest,
                session: Session) -> Any:
        if isinstance(msg, MetaRequest):
            return self._meta(msg, session)
        if isinstance(msg, PrepareRequest):
            return self._prepare(msg, session)
        if isinstance(msg, PatternRequest):  # the KV path check (selftest.py)
            from .selftest import serve_pattern

            return serve_pattern(self, msg, session)
        raise UnexpectedMessage(f"unexpected {type(msg).__name__}")

    def _meta(self, msg: MetaRequest, session: Session) -> MetaReply:
        if msg.hash != self.hash:
            raise HashMismatch(differing_factors(msg.factors, self.factors), msg.hash, self.hash)
        if msg.spec.model != self.spec.model:
            raise ProtocolError(f"model geometry differs: decode {msg.spec.model}, "
                                f"prefill {self.spec.model}")
        try:
            tm = self.templates.get(self.spec, msg.spec)  # refuse an unplannable pair now
            if tm is not None:  # the gather's program: built here, not on the engine's thread
                with on_stream(self.stream, None):
                    program_for(tm.gather, self.device, gather=True)
            with self.lock:
                agent = self.transport.add_peer(msg.agent_meta)
        except (GeometryError, PlanError) as e:
            raise Refusal("plan", str(e)) from None
        except TransferError as e:
            raise Refusal("nixl", str(e)) from None
        if isinstance(session.context, _Consumer):  # a second meta on the same connection
            self._forget_consumer(session.context.spec)
        session.context = _Consumer(agent, msg.spec)
        with self._consumers_lock:
            self._consumers[msg.spec] = self._consumers.get(msg.spec, 0) + 1
        return MetaReply(self.hash, self.factors, self.spec, self.name, self.transport.metadata(),
                         StagingRegion(self.staging.data_ptr(), self.staging.numel(),
                                       Transport.dev_id(self.staging)),
                         self.leases.lease_s)

    def _prepare(self, msg: PrepareRequest, session: Session) -> PrepareReply:
        peer = session.context
        if not isinstance(peer, _Consumer):
            raise UnexpectedMessage("prepare before meta on this connection")
        try:
            return self._gather(msg, peer)
        except LeaseError as e:
            raise Refusal("lease", str(e)) from None
        except StagingFull as e:
            raise Refusal("staging-full", str(e)) from None
        except (PlanError, GeometryError) as e:
            raise Refusal("plan", str(e)) from None

    def _gather(self, msg: PrepareRequest, peer: _Consumer) -> PrepareReply:
        rid = msg.req_id
        self.leases.get(rid)  # raises LeaseError when expired / consumed / unknown
        held = self._held.get(rid)
        if held is not None and held.packed is None:
            raise PlanError(f"request {rid!r}: its block tables are not lists of integers")
        if held is None or msg.p_req.num_tokens != held.req.num_tokens \
                or msg.p_req.block_tables != held.packed:  # D's copy, as sent, is what P holds
            raise LeaseError(f"request {rid!r}: block table differs from the one this rank holds")
        mine = held.req
        t0 = time.perf_counter()
        T = mine.num_tokens
        if msg.num_tokens != T:
            raise PlanError(f"token counts differ: prefill {T}, decode {msg.num_tokens}")
        tm = self.templates.get(self.spec, peer.spec)
        if tm is None or tm.nbytes(T) == 0:
            raise PlanError(f"decode rank {peer.spec.tp_rank} reads nothing from prefill rank "
                            f"{self.spec.tp_rank}")
        nbytes = tm.nbytes(T)
        consumer = consumer_id(peer.agent, peer.spec.tp_rank)
        staged = self.leases.claim(rid, peer.spec, consumer, tm.expected)
        if staged is not None:  # gathered at hold(): same template and token count
            off, t1 = staged.off, time.perf_counter()
            if staged.done is not None:
                staged.done.synchronize()
        else:
            dyn = tm.dyn("prefill", mine, T)
            off = self.leases.slot(rid, consumer, nbytes, tm.expected)
            with on_stream(self.stream, held.written):  # a new program uploads its tables here
                prog = program_for(tm.gather, self.device, gather=True)
                t1 = time.perf_counter()
                prog.run(self.arena, self.staging, dyn, off)  # uploads tables + scalars, launches
                wait_device(self.device)  # this stream's work: the gather
        return PrepareReply(self.staging.data_ptr() + off, nbytes, Transport.dev_id(self.staging),
                            self.leases.lease_s, tm.rows(T), t1 - t0, time.perf_counter() - t1)

    def stats(self) -> dict:
        return {"held": self.leases.held(), "staging_in_use": self.leases.alloc.in_use(),
                "staged_bytes": self.leases.staged_bytes(), "staged_claims": self.leases.claims,
                "stage_failures": self._stage_failures,
                "completed": self.leases.consumed, "expired": self.leases.expired,
                "auth_failures": self.server.auth_failures, "refused": self.server.refused}

    def close(self) -> None:
        self._stop = True
        self.server.close()
        self._poller.join(timeout=1)
        with self.lock:
            self.transport.reset() if not self.own_transport else self.transport.close()


@dataclass
class PullStats:
    bytes: int = 0
    seconds: float = 0.0
    read_seconds: float = 0.0
    peers: int = 0
    descriptors: int = 0
    gather_segments: int = 0
    scatter_segments: int = 0
    plan_seconds: float = 0.0  # D planning + P planning (as P reports it)
    gather_seconds: float = 0.0  # P's gather kernel
    scatter_seconds: float = 0.0  # D's scatter kernel
    # PREPARE round trip as D sees it: P's gather, and D's table upload, which runs meanwhile
    prepare_seconds: float = 0.0

    @property
    def data_path_seconds(self) -> float:
        """gather kernel + READ + scatter kernel: the bytes' own path, without planning or RPC."""
        return self.gather_seconds + self.read_seconds + self.scatter_seconds


@dataclass
class _Peer:
    client: SideChannelClient
    agent: str
    staging: StagingRegion
    lease_s: float


class DecodeRank:
    """Connects to every prefill rank (hash first), then pulls requests: PREPARE to every peer
    at once, one READ per peer, one scatter kernel per peer."""

    def __init__(self, spec: RankSpec, factors: dict, token: bytes, device: str = "cpu", *,
                 name: str | None = None, arena: torch.Tensor | None = None,
                 timeout: float = 30.0, transport: Transport | None = None,
                 recv_bytes: int | None = None):
        """`recv_bytes`: the receive buffer one pull lands in before the scatter; by default
        the arena's size (any request fits). Smaller saves device memory: a pull that needs
        more is refused before anything is sent."""
        self.token = require_token(token)  # before anything is allocated or registered
        self.spec, self.device, self.factors = spec, device, factors
        self.hash = hash_factors(factors)
        nb = arena_layout(spec).nbytes
        self.arena = arena if arena is not None else torch.zeros(nb, dtype=torch.uint8, device=device)
        self.recv = torch.zeros(recv_bytes or nb + (1 << 16), dtype=torch.uint8, device=device)
        self.own_transport = transport is None
        self.transport = transport or Transport(name or f"decode-{spec.tp_rank}-{id(self):x}", device)
        self.name = self.transport.name
        self.transport.register(self.arena)
        self.transport.register(self.recv)
        self.stream = transfer_stream(device)  # table uploads and scatters (kernels/kvcopy.py)
        self.timeout = timeout
        self.peers: dict[int, _Peer] = {}
        self.p_pool: RankSpec | None = None
        self.templates = TemplateCache()
        self._pair_cache: list | None = None
        self._release: list[int] = []

    def connect(self, addrs: list[tuple[str, int]]) -> None:
        """Handshake with every prefill rank: hash first, then geometry and NIXL metadata."""
        for host, port in addrs:
            cl = SideChannelClient(host, port, self.token, self.timeout)
            try:
                self._add_peer(cl)
            except BaseException:
                cl.close()
                raise
        if self.p_pool is None or sorted(self.peers) != list(range(self.p_pool.tp_size)):
            want = f"0..{self.p_pool.tp_size - 1}" if self.p_pool else "at least one"
            raise HandshakeError(f"expected prefill ranks {want}, got {sorted(self.peers)}")

    def _add_peer(self, cl: SideChannelClient) -> None:
        rep = cl.open(MetaRequest(self.hash, self.factors, self.spec, self.transport.metadata()))
        if not isinstance(rep, MetaReply):
            raise UnexpectedMessage(f"expected meta-reply from {cl.where}, got {type(rep).__name__}")
        compare_hash(self.factors, self.hash, rep.factors, rep.hash)
        pspec = rep.spec
        if pspec.model != self.spec.model:
            raise ProtocolError(f"{cl.where}: model geometry differs: decode {self.spec.model}, "
                                f"prefill {pspec.model}")
        if self.p_pool is not None and pspec.with_rank(0) != self.p_pool.with_rank(0):
            raise ProtocolError(f"{cl.where}: prefill ranks disagree on their pool geometry")
        if pspec.tp_rank in self.peers:
            raise ProtocolError(f"{cl.where}: prefill rank {pspec.tp_rank} is already connected")
        agent = self.transport.add_peer(rep.agent_meta)
        self.peers[pspec.tp_rank] = _Peer(cl, agent, rep.staging, rep.lease_s)
        self.p_pool = pspec
        self._pair_cache = None

    def _pairs(self, p_pool: RankSpec) -> list:
        """[(p_rank, PairTemplate)] for the P ranks this D rank reads from (built once)."""
        if self._pair_cache is None:
            pairs = []
            for pr in range(p_pool.tp_size):
                tm = self.templates.get(p_pool.with_rank(pr), self.spec)
                if tm is not None:
                    pairs.append((pr, tm))
            self._pair_cache = pairs
            self._release = self.templates.release_only(p_pool, self.spec)
        return self._pair_cache

    def pull(self, req_id: str, p_req: Request, d_req: Request) -> PullStats:
        p_pool = self.p_pool
        if p_pool is None:
            raise NotConnected("DecodeRank.pull before connect()")
        _check_req_id(req_id)
        t0 = time.perf_counter()
        tl0 = time.monotonic()
        T = p_req.num_tokens
        if d_req.num_tokens != T:
            raise PlanError(f"token counts differ: prefill {T}, decode {d_req.num_tokens}")
        pairs, sizes = [], []
        for pr, tm in self._pairs(p_pool):
            nb = tm.nbytes(T)
            if nb > 0:
                pairs.append((pr, tm))
                sizes.append(nb)
        recv_offs, recv_off = [], 0
        for nb in sizes:
            recv_offs.append(recv_off)
            recv_off += (nb + 255) // 256 * 256
        if recv_off > self.recv.numel():
            raise TransferError(f"request {req_id}: {T} tokens need {recv_off} bytes of receive "
                                f"buffer, this decode rank has {self.recv.numel()} (recv_bytes)")
        d_arr = _arrays(d_req) if len(pairs) > 1 else d_req  # several peers: convert once
        dyns = [tm.dyn("decode", d_arr, T) for _, tm in pairs]  # D's tables checked first
        st = PullStats(bytes=sum(sizes), peers=len(pairs))
        lease = min((self.peers[pr].lease_s for pr, _ in pairs), default=30.0)
        tp = time.perf_counter()
        started, err = self._start_all(PrepareRequest(req_id, T, req_to_wire(p_req)),
                                       [pr for pr, _ in pairs])
        # the tables + scalars of every peer go up while P answers (one copy, on this rank's
        # stream); whatever happens, every peer asked is drained before anything is raised. A
        # failed upload leaves P's slot to the lease (a release would count this rank as done)
        tu = time.perf_counter()
        try:
            with on_stream(self.stream, None):
                progs = [program_for(tm.scatter, self.device, gather=False) for _, tm in pairs]
                bts = upload_all(self.arena.device, list(zip(dyns, recv_offs)))
        except BaseException:
            self._finish_all(started, err, quiet=True)
            raise
        tf = time.perf_counter()
        st.plan_seconds = (tp - t0) + (tf - tu)  # D's own; P's plan is added below
        replies = self._finish_all(started, err)
        st.prepare_seconds = time.perf_counter() - tp  # D's upload ran inside it
        for (pr, _), nb in zip(pairs, sizes):
            rep = replies[pr]
            if rep.nbytes != nb:
                raise TransferError(f"prefill rank {pr} staged {rep.nbytes} bytes, planned {nb}")
            _check_in_staging(pr, rep, self.peers[pr].staging)
            st.gather_segments += rep.gather_segments
            st.plan_seconds += rep.plan_s
            st.gather_seconds = max(st.gather_seconds, rep.gather_s)
        tr = time.perf_counter()
        handles = []
        for (pr, tm), nb, ro in zip(pairs, sizes, recv_offs):
            handles.append(self.transport.read(
                self.peers[pr].agent, (self.recv.data_ptr() + ro, nb, Transport.dev_id(self.recv)),
                (replies[pr].addr, nb, replies[pr].dev), f"{req_id}:{self.spec.tp_rank}:{tm.expected}"))
            st.descriptors += 1
        self.transport.wait(handles, self.timeout)
        st.read_seconds = time.perf_counter() - tr
        if time.monotonic() - tl0 > lease * 0.9:
            raise LeaseError(f"request {req_id}: READ finished after the prefill lease ({lease}s); "
                             "data may be stale")
        ts = time.perf_counter()
        with on_stream(self.stream, None):  # after this stream's table upload
            for (pr, tm), pg, dy, bt, ro in zip(pairs, progs, dyns, bts, recv_offs):
                pg.run(self.recv, self.arena, dy, ro, bt)
                st.scatter_segments += tm.rows(T)
            wait_device(self.device)
        st.scatter_seconds = time.perf_counter() - ts
        for pr in self._release:
            exp = expected_consumers(p_pool.with_rank(pr), self.spec, pr)
            self.transport.send_notif(self.peers[pr].agent, f"REL:{req_id}:{self.spec.tp_rank}:{exp}")
        st.seconds = time.perf_counter() - t0
        return st

    def _start_all(self, req: PrepareRequest,
                   ranks: list[int]) -> tuple[list[int], HandshakeError | None]:
        """PREPARE to every peer at once (one round trip for all, not one per peer): the ranks
        asked, and the error that stopped the asking (raised by `_finish_all`)."""
        started: list[int] = []
        for pr in ranks:
            try:
                self.peers[pr].client.start(req)
            except HandshakeError as e:
                return started, e
            started.append(pr)
        return started, None

    def _finish_all(self, started: list[int], err: HandshakeError | None,
                    quiet: bool = False) -> dict[int, PrepareReply]:
        """Every reply of `started`; every peer asked is drained before the first error is
        raised (none when `quiet`: the caller raises its own)."""
        replies: dict[int, PrepareReply] = {}
        for pr in started:
            try:
                rep = self.peers[pr].client.finish()
                if not isinstance(rep, PrepareReply):
                    raise UnexpectedMessage(f"expected prepare-reply, got {type(rep).__name__}")
                replies[pr] = rep
            except HandshakeError as e:
                err = err or e
        if err is not None and not quiet:
            raise err
        return replies

    def close(self) -> None:
        for p in self.peers.values():
            p.client.close()
        self.transport.reset() if not self.own_transport else self.transport.close()
