"""The transfer self-test behind `pd-runtime transfer-test`: prove a P/D pairing before
deploying it (like nccl-tests).

P ranks and D ranks run as separate processes. Each cell: P ranks fill their caches with random
KV (stored from a random logical KV through the reference), serve the real side channel, D ranks
handshake (hash, HMAC token), pull every request over NIXL (one READ per request and peer), and
compare their whole cache, byte for byte, with the reference's expectation (untouched bytes
included). One pool of processes runs many cells, so the CI suite starts Python only a few times.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Any

from . import __version__ as RUNTIME_VERSION


@dataclass
class Cell:
    family: str = "dense"
    num_kv_heads: int = 4
    head_size: int = 16
    layers: int = 2
    p_tp: int = 1
    d_tp: int = 1
    p_block: int = 16
    d_block: int = 16
    p_layout: str = "HND"
    d_layout: str = "HND"
    dtype: str = "bfloat16"  # bfloat16 | float16 | fp8 (fp8 cache, bf16 model)
    tokens: int = 100
    requests: int = 2
    seed: int = 0
    sliding_window: int = 37
    model: str = "pd-runtime/transfer-test"
    iters: int = 1  # extra timed pulls of the same requests (benchmarking)
    token: str = "transfer-test-token"
    # the decode side may differ, to prove the handshake refuses a wrong token or another model
    d_token: str | None = None
    d_model: str | None = None
    lease_s: float = 30.0
    timeout_s: float = 30.0

    def model_spec(self):
        from .kvcache import ModelSpec

        fam = self.family
        return ModelSpec(
            family=fam if fam != "moe" else "dense",
            num_layers=self.layers,
            num_kv_heads=1 if fam == "mla" else self.num_kv_heads,
            head_size=self.head_size,
            dtype="bfloat16" if self.dtype == "fp8" else self.dtype,
            cache_dtype="fp8" if self.dtype == "fp8" else "auto",
            kv_lora_rank=4 * self.head_size,
            rope_dim=self.head_size // 2 or 1,
            sliding_window=self.sliding_window if fam == "sliding" else 0,
            ssm_heads=max(2, self.num_kv_heads),
            ssm_head_dim=self.head_size,
            ssm_groups=2 if self.num_kv_heads % 2 == 0 else 1,
            d_state=8,
            conv_kernel=4,
        )

    def pools(self):
        from .kvcache import RankSpec, blocks_needed

        m = self.model_spec()
        nb_p = self.requests * blocks_needed(self.tokens, self.p_block) + 2
        nb_d = self.requests * blocks_needed(self.tokens, self.d_block) + 2
        p = RankSpec(m, self.p_tp, 0, self.p_block, self.p_layout, nb_p, self.requests + 1)
        d = RankSpec(m, self.d_tp, 0, self.d_block, self.d_layout, nb_d, self.requests + 1)
        return p, d

    def factors(self, side: str) -> dict:
        from .compat.hashing import builtin_factors

        m = self.model_spec()
        return builtin_factors(
            runtime_version=RUNTIME_VERSION,
            model=(self.d_model or self.model) if side == "d" else self.model,
            dtype=m.dtype,
            num_kv_heads=m.num_kv_heads,
            head_size=m.head_size,
            num_hidden_layers=m.num_layers,
            cache_dtype=m.cache_dtype,
            family=self.family,
        )

    def label(self) -> str:
        return (f"{self.family} {self.dtype} TP {self.p_tp}->{self.d_tp} "
                f"block {self.p_block}->{self.d_block} {self.p_layout}->{self.d_layout}")


def cell_requests(cell: Cell):
    """Deterministic requests with disjoint blocks: [(req_id, p_req, d_req, logical)]."""
    import numpy as np

    from .kvcache import GROUP_STATE, blocks_needed, groups_of, make_block_table
    from .planner import Request
    from .reference import random_logical

    p, d = cell.pools()
    rng = np.random.default_rng(cell.seed)
    tables = {}
    for side, spec in (("p", p), ("d", d)):
        per: list[dict[int, list[int]]] = [{} for _ in range(cell.requests)]
        for g in groups_of(spec.model):
            pool = spec.num_state_slots if g == GROUP_STATE else spec.num_blocks
            ids = [int(x) for x in rng.permutation(pool)]
            for i in range(cell.requests):
                n = 1 if g == GROUP_STATE else blocks_needed(cell.tokens, spec.block_size)
                mine, ids = ids[:n], ids[n:]
                per[i][g] = make_block_table(spec.model, g, cell.tokens, spec.block_size, mine)
        tables[side] = per
    out = []
    for i in range(cell.requests):
        out.append((f"req{cell.seed}x{i}", Request(cell.tokens, tables["p"][i]),
                    Request(cell.tokens, tables["d"][i]),
                    random_logical(p, cell.tokens, cell.seed * 7919 + i)))
    return out


# ---------------------------------------------------------------------------------------------
# worker processes


def _transport(state: dict, name: str, device: str):
    """One NIXL agent per worker process, reused by every cell (agents are not cheap)."""
    if state.get("transport") is None:
        from .transport import Transport

        state["transport"] = Transport(name, device)
    return state["transport"]


def build_prefill(cell: Cell, rank: int, device: str, transport=None, *, hold_requests=True, **kw):
    """P rank `rank` of `cell`: its arena filled from the cell's logical KV, every request held
    (unless `hold_requests` is false: then the caller holds them, e.g. after D connected)."""
    import torch

    from .reference import random_arena, store
    from .worker import PrefillRank

    p, _ = cell.pools()
    spec = p.with_rank(rank)
    arena = random_arena(spec, cell.seed * 31 + 1000 + rank)
    reqs = cell_requests(cell)
    for _, preq, _, lg in reqs:
        store(spec, arena, preq, lg)
    pr = PrefillRank(spec, cell.factors("p"), cell.token.encode(), device, lease_s=cell.lease_s,
                     arena=torch.from_numpy(arena).to(device), transport=transport, **kw)
    for rid, preq, _, _ in reqs if hold_requests else []:
        pr.hold(rid, preq)
    return pr


def build_decode(cell: Cell, rank: int, device: str, transport=None):
    """(D rank `rank` of `cell`, the arena it must hold after pulling every request)."""
    import torch

    from .reference import random_arena, store
    from .worker import DecodeRank

    _, d = cell.pools()
    spec = d.with_rank(rank)
    init = random_arena(spec, cell.seed * 31 + 2000 + rank)
    want = init.copy()
    for _, _, dreq, lg in cell_requests(cell):
        store(spec, want, dreq, lg)
    dr = DecodeRank(spec, cell.factors("d"), (cell.d_token or cell.token).encode(), device,
                    arena=torch.from_numpy(init).to(device), timeout=cell.timeout_s,
                    transport=transport)
    return dr, want


def _p_setup(state: dict, cell: Cell, rank: int, device: str) -> dict:
    if state.get("rank_obj"):
        state["rank_obj"].close()
        state["rank_obj"] = None
    pr = build_prefill(cell, rank, device, _transport(state, f"p{rank}-{os.getpid()}", device))
    state["rank_obj"] = pr
    return {"addr": list(pr.address)}


def _d_run(state: dict, cell: Cell, rank: int, device: str, addrs: list) -> dict:
    import numpy as np

    out: dict[str, Any] = {"rank": rank}
    try:
        dr, want = build_decode(cell, rank, device,
                                _transport(state, f"d{rank}-{os.getpid()}", device))
    except Exception as e:  # noqa: BLE001 - reported to the controller
        return dict(out, error=type(e).__name__, message=str(e))
    try:
        dr.connect([tuple(a) for a in addrs])
        stats = [dr.pull(rid, preq, dreq) for rid, preq, dreq, _ in cell_requests(cell)]
        got = dr.arena.cpu().numpy()
        out.update(
            mismatched_bytes=int(np.count_nonzero(got != want)),
            bytes=sum(s.bytes for s in stats),
            seconds=sum(s.seconds for s in stats),
            read_seconds=sum(s.read_seconds for s in stats),
            descriptors=sum(s.descriptors for s in stats),
            gather_segments=sum(s.gather_segments for s in stats),
            scatter_segments=sum(s.scatter_segments for s in stats),
            peers=max(s.peers for s in stats),
        )
        out["error"] = None
    except Exception as e:  # noqa: BLE001 - reported to the controller
        out["error"] = type(e).__name__
        out["message"] = str(e)
        out["differing"] = getattr(e, "differing", None)
    finally:
        dr.close()
    return out


def _worker_main(role: str, rank: int, device: str, conn) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    state: dict = {}
    while True:
        msg = conn.recv()
        cmd = msg[0]
        try:
            if cmd == "exit":
                if state.get("rank_obj"):
                    state["rank_obj"].close()
                conn.send({"ok": True})
                return
            if cmd == "setup":
                conn.send(_p_setup(state, Cell(**msg[1]), rank, device))
            elif cmd == "run":
                conn.send(_d_run(state, Cell(**msg[1]), rank, device, msg[2]))
            elif cmd == "stats":
                obj = state.get("rank_obj")
                conn.send(obj.stats() if obj else {})
            elif cmd == "teardown":
                if state.get("rank_obj"):
                    state["rank_obj"].close()
                    state["rank_obj"] = None
                conn.send({"ok": True})
        except Exception as e:  # noqa: BLE001
            conn.send({"error": type(e).__name__, "message": str(e),
                       "trace": traceback.format_exc()})


class Pool:
    """max P ranks + max D ranks worker processes, reused across cells."""

    def __init__(self, n_p: int, n_d: int, device: str = "cpu"):
        self.ctx = mp.get_context("spawn")
        self.device = device
        self.p = [self._spawn("p", r) for r in range(n_p)]
        self.d = [self._spawn("d", r) for r in range(n_d)]

    def _spawn(self, role: str, rank: int):
        a, b = self.ctx.Pipe()
        proc = self.ctx.Process(target=_worker_main, args=(role, rank, self.device, b), daemon=True)
        proc.start()
        return [proc, a]

    def _ask(self, w, msg, timeout: float = 120.0):
        proc, conn = w
        try:
            conn.send(msg)
            if not conn.poll(timeout):
                raise TimeoutError(f"worker {proc.pid} did not answer {msg[0]!r} in {timeout}s")
            return conn.recv()
        except (EOFError, ConnectionResetError, BrokenPipeError):
            proc.join(timeout=5)
            return {"dead": True, "error": "WorkerDied",
                    "message": f"worker {proc.pid} died (exit {proc.exitcode})"}

    def _alive(self, group: list, role: str) -> None:
        for i, w in enumerate(group):
            if not w[0].is_alive():
                group[i] = self._spawn(role, i)

    def run_cell(self, cell: Cell) -> dict:
        self._alive(self.p, "p")
        self._alive(self.d, "d")
        c = asdict(cell)
        res: dict[str, Any] = {"cell": c, "label": cell.label()}
        addrs = []
        for r in range(cell.p_tp):
            rep = self._ask(self.p[r], ("setup", c))
            if "error" in rep:
                res.update(ok=False, error=rep["error"], message=rep["message"])
                return res
            addrs.append(rep["addr"])
        for r in range(cell.d_tp):
            self.d[r][1].send(("run", c, addrs))
        outs: list[dict[str, Any]] = []
        for r in range(cell.d_tp):
            proc, conn = self.d[r]
            limit = cell.timeout_s * 3 + cell.lease_s * 2 + 60
            if not conn.poll(limit):
                outs.append({"rank": r, "error": "Timeout",
                             "message": "decode rank did not finish"})
            else:
                outs.append(conn.recv())
        res["decode"] = outs
        # the prefill side: give notifications / leases a moment, then count what is still held
        deadline = time.monotonic() + 3.0
        pstats: list[dict[str, Any]] = []
        while True:
            pstats = []
            for r in range(cell.p_tp):
                if self.p[r][0].is_alive():
                    pstats.append(self._ask(self.p[r], ("stats",), 10))
                else:
                    pstats.append({"dead": True})
            busy = any(s.get("held") or s.get("staging_in_use")
                       for s in pstats if not s.get("dead"))
            if not busy or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        for r in range(cell.p_tp):
            if self.p[r][0].is_alive():
                self._ask(self.p[r], ("teardown",), 10)
        pstats = [dict(s, dead=s.get("dead") or not self.p[r][0].is_alive())
                  for r, s in enumerate(pstats)]
        res["prefill"] = pstats
        errors = [o for o in outs if o.get("error")]
        mism = sum(o.get("mismatched_bytes", 0) for o in outs)
        nbytes = sum(o.get("bytes", 0) for o in outs)
        secs = max((o.get("seconds", 0) for o in outs), default=0)
        rsecs = max((o.get("read_seconds", 0) for o in outs), default=0)
        leaked = sum((s.get("held", 0) or 0) + (s.get("staging_in_use", 0) or 0)
                     for s in pstats if not s.get("dead"))
        res.update(
            ok=not errors and mism == 0 and leaked == 0,
            mismatched_bytes=mism,
            bytes=nbytes,
            gbps=nbytes / secs / 1e9 if secs else 0.0,
            read_gbps=nbytes / rsecs / 1e9 if rsecs else 0.0,
            leaked=leaked,
            errors=errors,
        )
        return res

    def close(self) -> None:
        for w in self.p + self.d:
            try:
                if w[0].is_alive():
                    self._ask(w, ("exit",), 10)
            except Exception:  # noqa: BLE001
                pass
            w[0].join(timeout=5)
            if w[0].is_alive():
                w[0].kill()


def run_cells(cells: list[Cell], device: str = "cpu") -> list[dict]:
    pool = Pool(max(c.p_tp for c in cells), max(c.d_tp for c in cells), device)
    try:
        return [pool.run_cell(c) for c in cells]
    finally:
        pool.close()


def pairing_problems(cell: Cell, rules: str = "compat") -> tuple[list[str], str]:
    """Reasons the rules reject the pairing, and which checker said so: the compatibility rules
    (`compat`, as `pdctl check` with engine.type builtin) or the runtime's own capability table
    (`capabilities`)."""
    from . import capabilities
    from .kvcache import GeometryError

    pre = {"family": cell.family, "num_kv_heads": 1 if cell.family == "mla" else cell.num_kv_heads,
           "tp": cell.p_tp, "block_size": cell.p_block, "layout": cell.p_layout,
           "kv_cache_dtype": "fp8" if cell.dtype == "fp8" else "auto",
           "dtype": "bfloat16" if cell.dtype == "fp8" else cell.dtype, "model": cell.model}
    dec = dict(pre, tp=cell.d_tp, block_size=cell.d_block, layout=cell.d_layout)
    if rules == "capabilities":
        problems, checker = capabilities.unsupported(pre, dec), "pd_runtime.capabilities"
    else:
        problems, checker = _rule_problems(cell, pre, dec), "pd_runtime.compat.check_pools"
    if not problems:
        try:
            cell.pools()
        except (GeometryError, ValueError) as e:
            problems.append(str(e))
    return problems, checker


def _rule_problems(cell: Cell, pre: dict, dec: dict) -> list[str]:
    from .compat import check_pools, make_pool

    def pool(role: str, side: dict):
        return make_pool(
            role, engine_image="pd-runtime:" + RUNTIME_VERSION, model_name=cell.model,
            family="dense" if cell.family == "sliding" else cell.family, dtype=side["dtype"],
            num_kv_heads=side["num_kv_heads"], head_size=cell.head_size,
            num_hidden_layers=cell.layers,
            sliding_window=cell.sliding_window if cell.family == "sliding" else 0,
            mamba_type="mamba2" if cell.family == "hybrid-ssm" else None,
            tp=side["tp"], block_size=side["block_size"], attention_backend="auto",
            kv_cache_dtype=side["kv_cache_dtype"], kv_cache_layout=side["layout"],
            kv_cache_scales="packed" if side["kv_cache_dtype"] != "auto" else "static",
            prefix_caching=False, kv_lease_duration_s=int(cell.lease_s))

    decision = check_pools(pool("prefill", pre), pool("decode", dec), policy="Strict")
    return [f"{v.rule}: {v.message} (fix: {v.fix})" for v in decision.rejections]


# ---------------------------------------------------------------------------------------------
# the KV path check: a known pattern pulled from a live prefill engine (pd-runtime serve's
# POST /pd/v1/kv-path-check, serve/kvcheck.py). The same side channel, staging region, lease
# table, NIXL READ and release notification as a request's KV; only the bytes differ: P stages a
# pattern instead of gathering blocks, and D reads it into a scratch buffer of its own, never
# into the KV cache of live requests.

PATTERN_REQ_PREFIX = "kvcheck-"
DEFAULT_PATTERN_BYTES = 4 << 20


class PatternMismatch(RuntimeError):
    """The bytes D read differ from the pattern P was asked to stage."""

    def __init__(self, differing: int, first: int, nbytes: int):
        self.differing, self.first, self.nbytes = differing, first, nbytes
        super().__init__(f"{differing} of {nbytes} bytes differ from the pattern "
                         f"(first at offset {first})")


def pattern(seed: int, nbytes: int):
    """The pattern both sides compute: `nbytes` pseudo-random bytes from `seed` (CPU uint8)."""
    import numpy as np
    import torch

    raw = np.random.default_rng(seed).bytes(nbytes)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def serve_pattern(rank, msg, session):
    """P: PrefillRank `rank`'s answer to a PatternRequest on an authenticated connection that
    has sent its meta (the decode rank it names is the slot's consumer)."""
    from .lease import LeaseError, StagingFull, consumer_id
    from .protocol import PatternReply, Refusal, UnexpectedMessage
    from .worker import _Consumer

    peer = session.context
    if not isinstance(peer, _Consumer):
        raise UnexpectedMessage("pattern before meta on this connection")
    try:
        addr, dev, lease_s = stage_pattern(rank, msg.req_id, msg.nbytes, msg.seed,
                                           consumer_id(peer.agent, peer.spec.tp_rank))
    except LeaseError as e:
        raise Refusal("lease", str(e)) from None
    except StagingFull as e:
        raise Refusal("staging-full", str(e)) from None
    return PatternReply(addr, msg.nbytes, dev, lease_s)


def stage_pattern(rank, req_id: str, nbytes: int, seed: int, consumer: str):
    """P (PrefillRank `rank`): hold `req_id` with one staging slot for `consumer`, filled with the
    pattern; the consumer's READ notification or the lease's expiry frees it. Returns
    (address, device id, lease seconds). LeaseError / StagingFull when it cannot."""
    from .lease import LeaseError, StagingFull
    from .transport import Transport

    if not req_id.startswith(PATTERN_REQ_PREFIX):
        raise LeaseError(f"a pattern's request id starts with {PATTERN_REQ_PREFIX!r}")
    leases = rank.leases
    leases.hold(req_id)
    try:
        off = leases.slot(req_id, consumer, nbytes, expected=1)
    except StagingFull:
        leases.ack(req_id, consumer, expected=1)  # ends the lease now, not at its expiry
        raise
    rank.staging[off:off + nbytes].copy_(pattern(seed, nbytes).to(rank.staging.device))
    if rank.staging.is_cuda:
        import torch

        torch.cuda.synchronize(rank.staging.device)
    return rank.staging.data_ptr() + off, Transport.dev_id(rank.staging), leases.lease_s


@dataclass
class PatternPull:
    bytes: int
    seconds: float  # the whole check: connect, handshake, stage, READ, compare
    read_seconds: float  # the NIXL READ alone


class PatternProbe:
    """D: pulls a pattern from one prefill rank into a scratch buffer of its own.

    One NIXL agent and one registered scratch buffer of `max_bytes` for the life of the server,
    made at the first check: its metadata stays the same, so a prefill engine loads it once
    however often it is checked. One check at a time (callers serialize; `lock` is taken)."""

    def __init__(self, spec, factors: dict, token: bytes, device: str = "cpu",
                 max_bytes: int = 16 << 20):
        from .compat.hashing import hash_factors
        from .handshake import require_token

        self.spec, self.factors, self.device = spec, factors, device
        self.token = require_token(token)
        self.hash = hash_factors(factors)
        self.max_bytes = max_bytes
        self.transport: Any = None
        self.scratch: Any = None
        self.lock = threading.Lock()

    def _ready(self) -> None:
        if self.transport is not None:
            return
        import uuid

        import torch

        from .transport import Transport

        transport = Transport(f"kvcheck-{uuid.uuid4().hex[:12]}", self.device)
        scratch = torch.zeros(self.max_bytes, dtype=torch.uint8, device=self.device)
        transport.register(scratch)
        self.transport, self.scratch = transport, scratch

    def pull(self, host: str, port: int, nbytes: int, timeout: float) -> PatternPull:
        """Pull `nbytes` of a fresh pattern from the prefill rank at host:port and compare them.
        Raises HandshakeError (side channel), TransferError (NIXL), PatternMismatch."""
        import secrets
        import uuid

        from .handshake import SideChannelClient, compare_hash
        from .protocol import (
            MetaReply,
            MetaRequest,
            PatternReply,
            PatternRequest,
            ProtocolError,
            UnexpectedMessage,
        )

        if not 1 <= nbytes <= self.max_bytes:
            raise ValueError(f"bytes must be 1..{self.max_bytes}, got {nbytes}")
        with self.lock:
            t0 = time.perf_counter()
            self._ready()
            tr = self.transport
            client = SideChannelClient(host, port, self.token, timeout)
            agent = None
            try:
                meta = client.open(MetaRequest(self.hash, self.factors, self.spec, tr.metadata()))
                if not isinstance(meta, MetaReply):
                    raise UnexpectedMessage(f"expected meta-reply, got {type(meta).__name__}")
                compare_hash(self.factors, self.hash, meta.factors, meta.hash)
                agent = tr.add_peer(meta.agent_meta)
                req_id, seed = PATTERN_REQ_PREFIX + uuid.uuid4().hex, secrets.randbits(62)
                rep = client.call(PatternRequest(req_id, nbytes, seed))
                if not isinstance(rep, PatternReply):
                    raise UnexpectedMessage(f"expected pattern-reply, got {type(rep).__name__}")
                st = meta.staging
                if (rep.nbytes != nbytes or rep.dev != st.dev or rep.addr < st.addr
                        or rep.addr + nbytes > st.addr + st.nbytes):
                    raise ProtocolError("the prefill side named a pattern slot outside its "
                                        "staging region")
                t_read = time.perf_counter()
                handle = tr.read(agent, (self.scratch.data_ptr(), nbytes, tr.dev_id(self.scratch)),
                                 (rep.addr, nbytes, rep.dev),
                                 f"{req_id}:{self.spec.tp_rank}:1")  # frees P's slot
                tr.wait([handle], timeout)
                read_s = time.perf_counter() - t_read
                _compare(self.scratch[:nbytes].cpu(), pattern(seed, nbytes))
                return PatternPull(nbytes, time.perf_counter() - t0, read_s)
            finally:
                client.close()
                if agent is not None:
                    tr.remove_peer(agent)  # a replaced prefill pod leaves nothing behind

    def close(self) -> None:
        with self.lock:
            if self.transport is not None:
                self.transport.close()
                self.transport = self.scratch = None


def _compare(got, want) -> None:
    diff = (got != want).nonzero()
    if diff.numel():
        raise PatternMismatch(int(diff.numel()), int(diff[0, 0]), int(want.numel()))
