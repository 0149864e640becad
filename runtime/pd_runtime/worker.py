"""Prefill and decode ranks: the handshake, the gather on P, one READ per peer, the scatter on D.

Per request: D checks its block tables against the cached pair templates (template.py) and
uploads them, sends PREPARE to every P rank it reads from (one round trip for all), P gathers
into a staging slot with the template kernel, D posts one READ per peer and scatters. Nothing is
planned per request; the planner (planner.py) is the reference the templates are tested against.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import msgspec
import torch

from .compat.hashing import hash_factors
from .handshake import HandshakeError, SideChannelClient, SideChannelServer, compare_hash
from .kernels.kvcopy import program_for
from .kvcache import RankSpec, arena_layout
from .lease import LeaseError, LeaseTable
from .planner import PlanError, Request, expected_consumers
from .template import TemplateCache
from .transport import Transport, TransferError

__all__ = ["PrefillRank", "DecodeRank", "TransferError", "HandshakeError", "LeaseError", "req_to_wire", "req_from_wire"]


def req_to_wire(r: Request) -> dict:
    return {"num_tokens": r.num_tokens, "block_tables": {str(k): list(v) for k, v in r.block_tables.items()}}


def req_from_wire(d: dict) -> Request:
    return Request(int(d["num_tokens"]), {int(k): [int(x) for x in v] for k, v in d["block_tables"].items()})


def _same_request(mine: Request, wire: dict | None) -> bool:
    """D's copy of the prefill block tables (as sent) equals the one this rank holds."""
    if wire is None:
        return False
    if int(wire["num_tokens"]) != mine.num_tokens or len(wire["block_tables"]) != len(mine.block_tables):
        return False
    for k, v in wire["block_tables"].items():
        bt = mine.block_tables.get(int(k))
        if bt is None or list(bt) != list(v):
            return False
    return True


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class PrefillRank:
    """Serves metadata and PREPARE on the side channel; gathers into staging slots; frees on notif."""

    def __init__(self, spec: RankSpec, factors: dict, token: bytes, device: str = "cpu",
                 staging_bytes: int | None = None, lease_s: float = 30.0, host: str = "127.0.0.1",
                 port: int = 0, name: str | None = None, arena: torch.Tensor | None = None,
                 transport: Transport | None = None):
        self.spec, self.device, self.factors = spec, device, factors
        self.hash = hash_factors(factors)
        nb = arena_layout(spec).nbytes
        self.arena = arena if arena is not None else torch.zeros(nb, dtype=torch.uint8, device=device)
        staging_bytes = staging_bytes or 2 * nb + (1 << 20)
        self.staging = torch.zeros(staging_bytes, dtype=torch.uint8, device=device)
        self.leases = LeaseTable(staging_bytes, lease_s)
        self.requests: dict[str, Request] = {}
        self.templates = TemplateCache()  # per D geometry: built once, reused for every request
        self._dspecs: dict[str, RankSpec] = {}
        self.own_transport = transport is None
        self.transport = transport or Transport(name or f"prefill-{spec.tp_rank}-{id(self):x}", device)
        self.name = self.transport.name
        self.transport.register(self.arena)
        self.transport.register(self.staging)
        self.lock = threading.Lock()
        self.fault: str | None = None  # test hook: "die_after_prepare"
        self.server = SideChannelServer(token, self._handle, host, port)
        self._stop = False
        self._poller = threading.Thread(target=self._poll, daemon=True)
        self._poller.start()

    @property
    def address(self) -> tuple[str, int]:
        return self.server.host, self.server.port

    def hold(self, req_id: str, req: Request) -> None:
        """A finished prefill: its blocks stay until consumed or the lease expires."""
        if ":" in req_id or "," in req_id:
            raise ValueError("request ids may not contain ':' or ','")
        self.requests[req_id] = req
        self.leases.hold(req_id)

    def _poll(self) -> None:
        while not self._stop:
            try:
                with self.lock:
                    notes = self.transport.notifs()
                for _, msg in notes:
                    self.leases.handle_notif(msg)
                for r in self.leases.expire():
                    self.requests.pop(r, None)
                for r in list(self.leases.completed):
                    self.requests.pop(r, None)
            except Exception:  # noqa: BLE001 - keep polling; errors surface on the D side
                pass
            time.sleep(0.002)

    def _handle(self, req: dict) -> dict:
        op = req.get("op")
        if op == "meta":
            if req.get("hash") != self.hash:
                from .compat.hashing import differing_factors

                return {"error": "hash", "differing": differing_factors(req.get("factors", {}), self.factors),
                        "local_hash": req.get("hash", ""), "remote_hash": self.hash}
            with self.lock:
                self.transport.add_peer(req["agent_meta"])
            return {"ok": True, "hash": self.hash, "factors": self.factors, "spec": self.spec.to_dict(),
                    "agent_name": self.name, "agent_meta": self.transport.metadata(),
                    "staging": [self.staging.data_ptr(), self.staging.numel(), Transport.dev_id(self.staging)],
                    "lease_s": self.leases.lease_s}
        if op == "prepare":
            rid = req["req_id"]
            le = self.leases.get(rid)  # raises LeaseError when expired / unknown
            mine = self.requests.get(rid)
            if mine is None or not _same_request(mine, req.get("p_req")):
                raise LeaseError(f"request {rid!r}: block table differs from the one this rank holds")
            t0 = time.perf_counter()
            key = req["d_spec"]  # msgpack bytes of D's spec: a cheap cache key
            d = self._dspecs.get(key)
            if d is None:
                d = self._dspecs[key] = RankSpec.from_dict(msgspec.msgpack.decode(key))
            T = mine.num_tokens
            if int(req.get("num_tokens", T)) != T:
                raise PlanError(f"token counts differ: prefill {T}, decode {req['num_tokens']}")
            tm = self.templates.get(self.spec, d)
            if tm is None or tm.nbytes(T) == 0:
                raise LeaseError(f"decode rank {d.tp_rank} reads nothing from prefill rank {self.spec.tp_rank}")
            dyn = tm.dyn("prefill", mine, T)
            nbytes = tm.nbytes(T)
            le.expected = tm.expected
            off = self.leases.slot(rid, d.tp_rank, nbytes)
            prog = program_for(tm.gather, self.device, gather=True)
            t1 = time.perf_counter()
            prog.run(self.arena, self.staging, dyn, off)  # uploads the tables + scalars, launches
            _sync(self.device)
            t2 = time.perf_counter()
            if self.fault == "die_after_prepare":
                import os

                threading.Timer(0.05, lambda: os._exit(17)).start()
            return {"ok": True, "addr": self.staging.data_ptr() + off, "nbytes": nbytes,
                    "dev": Transport.dev_id(self.staging), "lease_s": self.leases.lease_s,
                    "gather_segments": tm.rows(T), "plan_s": t1 - t0, "gather_s": t2 - t1}
        raise HandshakeError(f"unknown op {op!r}")

    def stats(self) -> dict:
        return {"held": self.leases.held(), "staging_in_use": self.leases.alloc.in_use(),
                "completed": len(self.leases.completed), "expired": len(self.leases.expired),
                "auth_failures": self.server.auth_failures}

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
    prepare_seconds: float = 0.0  # PREPARE round trip as D sees it (includes P's gather)

    @property
    def data_path_seconds(self) -> float:
        """gather kernel + READ + scatter kernel: the bytes' own path, without planning or RPC."""
        return self.gather_seconds + self.read_seconds + self.scatter_seconds


@dataclass
class _Peer:
    client: SideChannelClient
    agent: str
    staging: tuple
    lease_s: float


class DecodeRank:
    def __init__(self, spec: RankSpec, factors: dict, token: bytes, device: str = "cpu",
                 name: str | None = None, arena: torch.Tensor | None = None, timeout: float = 30.0,
                 transport: Transport | None = None):
        self.spec, self.device, self.factors, self.token = spec, device, factors, token
        self.hash = hash_factors(factors)
        nb = arena_layout(spec).nbytes
        self.arena = arena if arena is not None else torch.zeros(nb, dtype=torch.uint8, device=device)
        self.recv = torch.zeros(nb + (1 << 16), dtype=torch.uint8, device=device)
        self.own_transport = transport is None
        self.transport = transport or Transport(name or f"decode-{spec.tp_rank}-{id(self):x}", device)
        self.name = self.transport.name
        self.transport.register(self.arena)
        self.transport.register(self.recv)
        self.timeout = timeout
        self.peers: dict[int, _Peer] = {}
        self.p_pool: RankSpec | None = None
        self.templates = TemplateCache()
        self._pair_cache: list | None = None
        self._release: list[int] = []
        self.fault: str | None = None  # test hook: "skip_read"

    def connect(self, addrs: list[tuple[str, int]]) -> None:
        """Handshake with every prefill rank: hash first, then geometry and NIXL metadata."""
        for host, port in addrs:
            cl = SideChannelClient(host, port, self.token, self.timeout)
            rep = cl.call({"op": "meta", "hash": self.hash, "factors": self.factors,
                           "agent_meta": self.transport.metadata()})
            compare_hash(self.factors, self.hash, rep["factors"], rep["hash"])
            pspec = RankSpec.from_dict(rep["spec"])
            agent = self.transport.add_peer(rep["agent_meta"])
            self.peers[pspec.tp_rank] = _Peer(cl, agent, tuple(rep["staging"]), float(rep["lease_s"]))
            self.p_pool = pspec
            self._pair_cache = None
        if self.p_pool is None or sorted(self.peers) != list(range(self.p_pool.tp_size)):
            raise HandshakeError(f"expected prefill ranks 0..{self.p_pool.tp_size - 1 if self.p_pool else '?'}, got {sorted(self.peers)}")

    def _pairs(self) -> list:
        """[(p_rank, PairTemplate)] for the P ranks this D rank reads from (built once)."""
        if self._pair_cache is None:
            assert self.p_pool is not None
            pairs = []
            for pr in range(self.p_pool.tp_size):
                tm = self.templates.get(self.p_pool.with_rank(pr), self.spec)
                if tm is not None:
                    pairs.append((pr, tm))
            self._pair_cache = pairs
            self._release = self.templates.release_only(self.p_pool, self.spec)
            self._d_spec_wire = msgspec.msgpack.encode(self.spec.to_dict())
        return self._pair_cache

    def pull(self, req_id: str, p_req: Request, d_req: Request) -> PullStats:
        assert self.p_pool is not None, "connect() first"
        t0 = time.perf_counter()
        tl0 = time.monotonic()
        T = p_req.num_tokens
        if d_req.num_tokens != T:
            raise PlanError(f"token counts differ: prefill {T}, decode {d_req.num_tokens}")
        pairs, sizes = [], []
        for pr, tm in self._pairs():
            nb = tm.nbytes(T)
            if nb > 0:
                pairs.append((pr, tm))
                sizes.append(nb)
        recv_offs, recv_off = [], 0
        for nb in sizes:
            recv_offs.append(recv_off)
            recv_off += (nb + 255) // 256 * 256
        dyns = [tm.dyn("decode", d_req, T) for _, tm in pairs]
        progs = [program_for(tm.scatter, self.device, gather=False) for _, tm in pairs]
        # tables + scalars go up now: the copy overlaps the PREPARE round trip
        bts = [pg.upload(dy, ro) for pg, dy, ro in zip(progs, dyns, recv_offs)]
        st = PullStats(bytes=sum(sizes), peers=len(pairs))
        st.plan_seconds = time.perf_counter() - t0
        handles = []
        lease = min((self.peers[pr].lease_s for pr, _ in pairs), default=30.0)
        p_wire = req_to_wire(p_req)
        # PREPARE to every peer at once, then collect the replies (one round trip, not one per peer)
        started, err = [], None
        for pr, _ in pairs:
            try:
                self.peers[pr].client.start({"op": "prepare", "req_id": req_id, "d_spec": self._d_spec_wire,
                                             "num_tokens": T, "p_req": p_wire})
            except Exception as e:  # noqa: BLE001 - collect the replies already asked for, then raise
                err = e
                break
            started.append(pr)
        replies = {}
        for pr in started:
            try:
                replies[pr] = self.peers[pr].client.finish()
            except Exception as e:  # noqa: BLE001 - drain every peer, then raise the first
                err = err or e
        if err is not None:
            raise err
        st.prepare_seconds = time.perf_counter() - t0 - st.plan_seconds
        for (pr, tm), nb in zip(pairs, sizes):
            if replies[pr]["nbytes"] != nb:
                raise TransferError(f"prefill rank {pr} staged {replies[pr]['nbytes']} bytes, planned {nb}")
            st.gather_segments += int(replies[pr].get("gather_segments", 0))
            st.plan_seconds += float(replies[pr].get("plan_s", 0.0))
            st.gather_seconds = max(st.gather_seconds, float(replies[pr].get("gather_s", 0.0)))
        if self.fault == "skip_read":
            return st
        tr = time.perf_counter()
        for (pr, tm), nb, ro in zip(pairs, sizes, recv_offs):
            peer = self.peers[pr]
            handles.append(self.transport.read(
                peer.agent, (self.recv.data_ptr() + ro, nb, Transport.dev_id(self.recv)),
                (replies[pr]["addr"], nb, replies[pr]["dev"]),
                f"{req_id}:{self.spec.tp_rank}:{tm.expected}"))
            st.descriptors += 1
        self.transport.wait(handles, self.timeout)
        st.read_seconds = time.perf_counter() - tr
        if time.monotonic() - tl0 > lease * 0.9:
            raise LeaseError(f"request {req_id}: READ finished after the prefill lease ({lease}s); data may be stale")
        ts = time.perf_counter()
        for (pr, tm), pg, dy, bt, ro in zip(pairs, progs, dyns, bts, recv_offs):
            pg.run(self.recv, self.arena, dy, ro, bt)
            st.scatter_segments += tm.rows(T)
        _sync(self.device)
        st.scatter_seconds = time.perf_counter() - ts
        for pr in self._release:
            exp = expected_consumers(self.p_pool.with_rank(pr), self.spec, pr)
            self.transport.send_notif(self.peers[pr].agent, f"REL:{req_id}:{self.spec.tp_rank}:{exp}")
        st.seconds = time.perf_counter() - t0
        return st

    def close(self) -> None:
        for p in self.peers.values():
            p.client.close()
        self.transport.reset() if not self.own_transport else self.transport.close()
