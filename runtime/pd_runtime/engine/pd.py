"""The P/D hand-over: vLLM's NixlConnector protocol (as vllm-router drives it) over the
runtime's own transfer engine (worker.PrefillRank / DecodeRank on the engine's KV arena).

P: a request with `kv_transfer_params.do_remote_decode: true` is prefilled and answers one
token. The KV of its first T - 1 prompt tokens stays in P's blocks, held by PrefillRank.hold
until D's release notification or the lease expiry; the final output carries the
kv_transfer_params below. D: validates them, allocates blocks, pulls those T - 1 tokens on each
of its TP ranks, then computes the last prompt token itself (its logits give the first token:
D never uses P's token) and decodes. Anything failing on the way is a KVPullFailed: D frees its
blocks and the client gets an error, never tokens built on missing KV.

kv_transfer_params from P (JSON, forwarded unchanged by the router):
    do_remote_prefill: true, do_remote_decode: false, pd_protocol: 1,
    remote_engine_id, remote_request_id (P's transfer id), remote_host, remote_port (side-channel
    base port; P rank r listens on base + r), tp_size (P's TP), remote_num_tokens (T - 1),
    remote_block_ids ({group: block ids}, as kvcache.make_block_table builds them),
    remote_block_size (information only: the handshake gives P's real geometry).
"""

from __future__ import annotations

import logging
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import torch

from ..kvcache import GROUP_STATE, RankSpec, blocks_needed
from ..planner import Request
from .errors import InvalidKVTransferParams, KVPullFailed

PD_PROTOCOL = 1
HB_BATCH = 32  # request ids per heartbeat notification
log = logging.getLogger(__name__)
_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
MAX_BLOCK_IDS = 1 << 20


class DecodeKVParams(msgspec.Struct, forbid_unknown_fields=False):
    """What D receives (P's answer, unchanged). Unknown extra fields are ignored."""

    do_remote_prefill: bool
    remote_engine_id: str
    remote_request_id: str
    remote_block_ids: dict[str, list[int]]
    remote_host: str
    remote_port: int
    tp_size: int
    remote_num_tokens: int
    pd_protocol: int
    do_remote_decode: bool = False
    remote_block_size: int | None = None

    def p_request(self) -> Request:
        return Request(self.remote_num_tokens,
                       {int(g): list(ids) for g, ids in self.remote_block_ids.items()})


class PrefillKVParams(msgspec.Struct, forbid_unknown_fields=False):
    """What the router sends P: do_remote_decode true, everything else null."""

    do_remote_decode: bool
    do_remote_prefill: bool = False


@dataclass(frozen=True)
class RemoteDecode:
    """Marker: this request is the prefill half of a P/D request."""


def parse_kv_transfer_params(raw: Any, prompt_len: int) -> RemoteDecode | DecodeKVParams | None:
    """Classify and validate a request's kv_transfer_params; InvalidKVTransferParams if bad."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise InvalidKVTransferParams("kv_transfer_params must be a JSON object")
    if raw.get("do_remote_prefill") is True:
        return _decode_params(raw, prompt_len)
    try:
        p = msgspec.convert(raw, PrefillKVParams)
    except msgspec.ValidationError as e:
        raise InvalidKVTransferParams(f"kv_transfer_params: {e}") from None
    return RemoteDecode() if p.do_remote_decode else None


def _decode_params(raw: dict, prompt_len: int) -> DecodeKVParams:
    if isinstance(raw.get("remote_block_ids"), list):  # vLLM's flat form: the full-attention group
        raw = {**raw, "remote_block_ids": {"0": raw["remote_block_ids"]}}
    try:
        p = msgspec.convert(raw, DecodeKVParams)
    except msgspec.ValidationError as e:
        raise InvalidKVTransferParams(f"kv_transfer_params: {e}") from None

    def bad(msg: str) -> InvalidKVTransferParams:
        return InvalidKVTransferParams(f"kv_transfer_params: {msg}")

    if p.pd_protocol != PD_PROTOCOL:
        raise bad(f"pd_protocol {p.pd_protocol} is not supported (this engine speaks {PD_PROTOCOL})")
    if p.do_remote_decode:
        raise bad("do_remote_prefill and do_remote_decode cannot both be true")
    if not _ID.match(p.remote_engine_id) or not _ID.match(p.remote_request_id):
        raise bad("remote_engine_id / remote_request_id must be 1-128 characters of [A-Za-z0-9_.-]")
    if not p.remote_host or len(p.remote_host) > 253 or any(c.isspace() for c in p.remote_host):
        raise bad(f"remote_host {p.remote_host!r} is not a host name")
    if not 1 <= p.tp_size <= 64:
        raise bad(f"tp_size {p.tp_size} outside 1..64")
    if not 1 <= p.remote_port <= 65536 - p.tp_size:
        raise bad(f"remote_port {p.remote_port} (+ tp_size) outside 1..65535")
    if p.remote_num_tokens != prompt_len - 1:
        raise bad(f"remote_num_tokens {p.remote_num_tokens} does not match this prompt "
                  f"({prompt_len} tokens: P holds all but the last)")
    if p.remote_num_tokens > 0 and not p.remote_block_ids:
        raise bad("remote_block_ids is empty")
    for g, ids in p.remote_block_ids.items():
        if g not in ("0", "1", "2"):
            raise bad(f"remote_block_ids: unknown KV-cache group {g!r}")
        if len(ids) > MAX_BLOCK_IDS or any(i < -1 for i in ids):
            raise bad(f"remote_block_ids[{g}]: block ids must be >= -1")
    if p.remote_block_size is not None:
        if p.remote_block_size < 1:
            raise bad(f"remote_block_size {p.remote_block_size} must be >= 1")
        check_tables(p, p.remote_block_size, None)
    return p


def check_tables(p: DecodeKVParams, block_size: int, pool: RankSpec | None) -> None:
    """P's block tables cover exactly remote_num_tokens tokens (one slot for SSM state), with
    ids inside P's pools when its geometry is known (after the handshake)."""
    want = blocks_needed(p.remote_num_tokens, block_size)
    for g, ids in p.remote_block_ids.items():
        state = int(g) == GROUP_STATE
        n = 1 if state else want
        if len(ids) != n:
            raise InvalidKVTransferParams(
                f"kv_transfer_params: remote_block_ids[{g}] has {len(ids)} ids; "
                f"{p.remote_num_tokens} tokens in blocks of {block_size} need {n}")
        limit = None if pool is None else pool.num_state_slots if state else pool.num_blocks
        if limit is not None and any(i >= limit for i in ids):
            raise InvalidKVTransferParams(
                f"kv_transfer_params: remote_block_ids[{g}] names a block or slot beyond the "
                f"prefill engine's {limit}")


def _factors_token(token: bytes | str) -> bytes:
    return token.encode() if isinstance(token, str) else token


@dataclass
class PDStats:
    kv_pulls: int = 0
    kv_pull_failures: int = 0
    kv_pull_bytes: int = 0
    kv_pull_seconds: float = 0.0
    kv_holds: int = 0
    kv_releases: int = 0


@dataclass
class PrefillSide:
    """P: one PrefillRank per local TP rank over the engine's arena; holds and releases."""

    ranks: list  # worker.PrefillRank (rank 0 here; other TP ranks hold through tp_worker)
    engine_id: str
    host: str
    port: int
    tp_size: int = 1
    block_size: int = 16
    hold_remote: Callable[[str, Request], None] | None = None  # TP: the other ranks hold too
    remote_held: Callable[[], set[str]] | None = None  # TP: ids the other ranks still hold
    held: dict[str, str] = field(default_factory=dict)  # transfer id -> sequence key
    stats: PDStats = field(default_factory=PDStats)

    def hold(self, key: str, req: Request) -> dict:
        """Keep `req`'s blocks for a decode engine; the kv_transfer_params to answer with."""
        tid = f"{self.engine_id[:8]}-{uuid.uuid4().hex}"
        if req.num_tokens > 0:
            for r in self.ranks:
                r.hold(tid, req)
            if self.hold_remote is not None:
                self.hold_remote(tid, req)
            self.held[tid] = key
            self.stats.kv_holds += 1
        params = DecodeKVParams(
            do_remote_prefill=True, do_remote_decode=False, pd_protocol=PD_PROTOCOL,
            remote_engine_id=self.engine_id, remote_request_id=tid,
            remote_block_ids={str(g): list(ids) for g, ids in req.block_tables.items()},
            remote_host=self.host, remote_port=self.port, tp_size=self.tp_size,
            remote_num_tokens=req.num_tokens, remote_block_size=self.block_size)
        return msgspec.to_builtins(params)  # the same type D validates with

    def released(self) -> list[str]:
        """Sequence keys whose hold ended (consumed by D or expired) on every local rank."""
        done = [tid for tid in self.held if all(tid not in r.requests for r in self.ranks)]
        if done and self.remote_held is not None:
            still = self.remote_held()
            done = [tid for tid in done if tid not in still]
        self.stats.kv_releases += len(done)
        return [self.held.pop(tid) for tid in done]

    def close(self) -> None:
        for r in self.ranks:
            r.close()


class DecodeSide:
    """D: one DecodeRank per P engine (connected once, cached), reading into the engine's arena.
    Pulls may run on a thread of their own (`asynchronous`): they touch only their own blocks."""

    asynchronous = True

    def __init__(self, spec: RankSpec, factors: dict, token: bytes | str, arena: torch.Tensor,
                 device: str = "cpu", timeout: float = 30.0, recv_bytes: int | None = None):
        self.spec, self.factors, self.token = spec, factors, _factors_token(token)
        self.arena, self.device, self.timeout = arena, device, timeout
        self.recv_bytes = recv_bytes  # each connection's receive buffer (DecodeRank)
        self.conns: dict[tuple[str, str, int, int], Any] = {}
        self.lock = threading.Lock()
        self.stats = PDStats()

    def _rank(self, p: DecodeKVParams) -> Any:
        from ..worker import DecodeRank

        key = (p.remote_engine_id, p.remote_host, p.remote_port, p.tp_size)
        dr = self.conns.get(key)
        if dr is None:
            dr = DecodeRank(self.spec, self.factors, self.token, self.device, arena=self.arena,
                            timeout=self.timeout, recv_bytes=self.recv_bytes)
            try:
                dr.connect([(p.remote_host, p.remote_port + r) for r in range(p.tp_size)])
            except Exception:
                dr.close()
                raise
            self.conns[key] = dr
        return dr

    def pull(self, p: DecodeKVParams, d_req: Request) -> int:
        """Pull P's tokens into `d_req`'s blocks; bytes moved. KVPullFailed on any failure."""
        with self.lock:
            try:
                dr = self._rank(p)
                pool = dr.p_pool
                if pool is not None:  # P's real geometry, from the handshake
                    check_tables(p, pool.block_size, pool)
                st = dr.pull(p.remote_request_id, p.p_request(), d_req)
            except InvalidKVTransferParams:
                self.stats.kv_pull_failures += 1
                raise
            except Exception as e:  # noqa: BLE001 - every failure is a failed pull, named
                self.stats.kv_pull_failures += 1
                self._drop(p)
                raise KVPullFailed(
                    f"KV pull from prefill engine {p.remote_engine_id} "
                    f"({p.remote_host}:{p.remote_port}) failed: {type(e).__name__}: {e}") from e
            self.stats.kv_pulls += 1
            self.stats.kv_pull_bytes += st.bytes
            self.stats.kv_pull_seconds += st.seconds
            return int(st.bytes)

    def lease_s(self) -> float | None:
        """The shortest lease of the P engines connected so far (None before any)."""
        leases = [peer.lease_s for dr in self.conns.values() for peer in dr.peers.values()]
        return min(leases) if leases else None

    def heartbeat(self, params: list[DecodeKVParams]) -> int:
        """Extend P's leases of requests still queued here (HB notifications), for the P engines
        this side is already connected to; skipped while a pull holds the connections. The
        number of notifications sent."""
        if not self.lock.acquire(blocking=False):
            return 0
        sent = 0
        try:
            ids: dict[tuple[str, str, int, int], list[str]] = {}
            for p in params:
                key = (p.remote_engine_id, p.remote_host, p.remote_port, p.tp_size)
                if key in self.conns:
                    ids.setdefault(key, []).append(p.remote_request_id)
            for key, rids in ids.items():
                dr = self.conns[key]
                for i in range(0, len(rids), HB_BATCH):
                    msg = "HB:" + ",".join(rids[i : i + HB_BATCH])
                    for peer in dr.peers.values():
                        dr.transport.send_notif(peer.agent, msg)
                        sent += 1
        except Exception:  # noqa: BLE001 - a lost heartbeat shows up as a failed pull, named
            log.warning("KV lease heartbeat failed", exc_info=True)
        finally:
            self.lock.release()
        return sent

    def _drop(self, p: DecodeKVParams) -> None:
        """Forget a connection after a failure (a dead or restarted P gets a fresh handshake)."""
        key = (p.remote_engine_id, p.remote_host, p.remote_port, p.tp_size)
        dr = self.conns.pop(key, None)
        if dr is not None:
            try:
                dr.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass

    def close(self) -> None:
        with self.lock:
            for dr in self.conns.values():
                dr.close()
            self.conns.clear()



def engine_factors(cfg: Any, model_name: str, cache_dtype: str = "auto") -> dict:
    """The compatibility factors this engine hashes in the handshake (compat.hashing)."""
    from .. import __version__
    from ..compat.hashing import builtin_factors

    m = cfg.model_spec(cache_dtype)
    return builtin_factors(runtime_version=__version__, model=model_name, dtype=m.dtype,
                           num_kv_heads=m.num_kv_heads, head_size=m.head_size,
                           num_hidden_layers=m.num_layers, cache_dtype=m.cache_dtype,
                           family=m.family)


def make_prefill_side(spec: RankSpec, factors: dict, token: bytes | str, arena: torch.Tensor, *,
                      host: str = "127.0.0.1", port: int = 0, advertise_host: str | None = None,
                      lease_s: float = 30.0, device: str = "cpu",
                      engine_id: str | None = None) -> PrefillSide:
    """P's side for TP rank `spec.tp_rank` of a pool listening on base `port` + rank."""
    from ..worker import PrefillRank

    rank = PrefillRank(spec, factors, _factors_token(token), device, lease_s=lease_s, host=host,
                       port=port + spec.tp_rank if port else 0, arena=arena)
    base = rank.address[1] - spec.tp_rank
    return PrefillSide([rank], engine_id or uuid.uuid4().hex, advertise_host or rank.address[0],
                       base, spec.tp_size, spec.block_size)
