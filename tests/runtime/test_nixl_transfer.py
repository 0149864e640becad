"""P ranks and D ranks over NIXL/UCX host memory, byte-exact.

One pool of worker processes runs every cell (families x TP directions x block relations x
layout pairs x dtypes) so Python and NIXL start only a few times. Failure tests: hash mismatch,
bad token, a prefill process killed mid-transfer, lease expiry, per-consumer release; faults
come from tests/runtime/faults.py (test-only transports and handler wrappers).
"""

from __future__ import annotations

import itertools

import pytest

from tests.helpers import eventually, nixl_import_error

NIXL_ERR = nixl_import_error()

pytestmark = [
    pytest.mark.nixl,
    pytest.mark.slow,
    pytest.mark.skipif(NIXL_ERR is not None, reason=f"nixl cannot be imported here: {NIXL_ERR}"),
]

FAMILIES = ["dense", "mla", "sliding", "hybrid-ssm"]
TPS = {"equal": (2, 2), "p<d": (1, 2), "p>d": (2, 1)}
BLOCKS = {"equal": (16, 16), "d=k*p": (8, 32), "other": (16, 12)}
LAYOUTS = [("HND", "HND"), ("HND", "NHD"), ("NHD", "HND"), ("NHD", "NHD")]
DTYPES = ["bfloat16", "fp8"]


def matrix():
    import os

    from pd_runtime.selftest import Cell

    cells = []
    full = os.environ.get("PD_RUNTIME_FULL_MATRIX") == "1"
    combos = list(itertools.product(FAMILIES, TPS, BLOCKS, LAYOUTS, DTYPES))
    if not full:  # every layout pair for every (family, TP, block, dtype) cell would be 4x: rotate
        combos = [(f, t, b, LAYOUTS[k % 4], d)
                  for k, (f, t, b, d) in enumerate(itertools.product(FAMILIES, TPS, BLOCKS, DTYPES))]
    for i, (fam, tp, bl, lay, dt) in enumerate(combos):
        p_tp, d_tp = TPS[tp]
        pb, db = BLOCKS[bl]
        cells.append(Cell(family=fam, num_kv_heads=4, head_size=8, layers=2, p_tp=p_tp, d_tp=d_tp,
                          p_block=pb, d_block=db, p_layout=lay[0], d_layout=lay[1], dtype=dt,
                          tokens=45, requests=2, seed=i + 1, sliding_window=19, timeout_s=20))
    # replicated KV (TP above the head count) in both directions, float16
    for j, (p_tp, d_tp) in enumerate([(2, 1), (1, 2), (2, 2)]):
        cells.append(Cell(family="dense", num_kv_heads=1, head_size=8, layers=2, p_tp=p_tp, d_tp=d_tp,
                          p_block=4, d_block=6, p_layout="NHD", d_layout="HND", dtype="float16",
                          tokens=33, seed=1000 + j))
    return cells


@pytest.fixture(scope="module")
def pool():
    from pd_runtime.selftest import Pool

    p = Pool(2, 2, "cpu")
    yield p
    p.close()


def test_matrix_byte_exact(pool):
    cells = matrix()
    failures = []
    for c in cells:
        r = pool.run_cell(c)
        if not r["ok"]:
            failures.append((r["label"], r.get("mismatched_bytes"), r.get("errors"), r.get("leaked"), r.get("message")))
        else:
            assert r["bytes"] > 0
            for o in r["decode"]:
                assert o["descriptors"] == o["peers"] * c.requests  # one READ per request and peer
    assert not failures, f"{len(failures)} of {len(cells)} cells failed: {failures[:5]}"


def _base(**kw):
    from pd_runtime.selftest import Cell

    d = dict(family="dense", num_kv_heads=4, head_size=8, layers=2, p_tp=1, d_tp=2, tokens=40, seed=77)
    d.update(kw)
    return Cell(**d)


def test_hash_mismatch_names_factor(pool):
    r = pool.run_cell(_base(d_model="another/model"))
    assert not r["ok"]
    errs = r["decode"]
    assert all(e["error"] == "HashMismatch" for e in errs)
    assert all(e["differing"] == ["model"] for e in errs)
    assert "model" in errs[0]["message"]


def test_bad_token_is_refused(pool):
    r = pool.run_cell(_base(d_token="not-the-secret"))
    assert not r["ok"]
    assert all(e["error"] == "AuthError" for e in r["decode"])
    assert r["prefill"][0]["auth_failures"] >= 1
    # and the data path was never opened: nothing held beyond the prefill's own leases
    assert r["prefill"][0]["staging_in_use"] == 0


def test_pool_replaces_a_dead_worker(pool):
    pool.p[0][0].kill()
    pool.p[0][0].join(10)
    r = pool.run_cell(_base(p_tp=1, d_tp=1, seed=78))
    assert r["ok"], r


# ------------------------------------------------------------------------------------------------
# P and D in this process (or P in one spawned process), faults from tests/runtime/faults.py


def test_prefill_killed_mid_transfer():
    import multiprocessing as mp

    from pd_runtime.protocol import HandshakeError
    from pd_runtime.selftest import build_decode, cell_requests
    from pd_runtime.transport import TransferError

    from . import faults

    cell = _base(p_tp=1, d_tp=1, timeout_s=5)
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=faults.serve_prefill, args=(faults.cell_dict(cell), there, True),
                       daemon=True)
    proc.start()
    there.close()  # a prefill process that crashes at start gives EOF here, not a long wait
    try:
        assert here.poll(300), "the prefill process did not start"
        addr = here.recv()
        dr, _ = build_decode(cell, 0, "cpu", faults.SlowReadTransport("d-slow", "cpu", 0.5))
        try:
            dr.connect([tuple(addr)])
            rid, preq, dreq, _ = cell_requests(cell)[0]
            with pytest.raises((TransferError, HandshakeError)):
                dr.pull(rid, preq, dreq)
        finally:
            dr.close()
            dr.transport.close()
        proc.join(10)
        assert proc.exitcode == faults.DIED_EXIT_CODE
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(5)


@pytest.fixture
def pair():
    """(make(cell, d_transport=None, on_release=None) -> (P rank 0, [D ranks]))."""
    from pd_runtime.selftest import build_decode, build_prefill

    made = []

    def make(cell, d_transport=None, on_release=None):
        pr = build_prefill(cell, 0, "cpu", on_release=on_release)
        made.append(pr)
        drs = []
        for r in range(cell.d_tp):
            dr, want = build_decode(cell, r, "cpu", d_transport if r == 0 else None)
            made.append(dr)
            dr.connect([pr.address])
            drs.append((dr, want))
        return pr, drs

    yield make
    for obj in reversed(made):
        obj.close()
        if not obj.own_transport:
            obj.transport.close()


def test_lease_expiry_frees_everything(pair):
    from pd_runtime.protocol import PeerError
    from pd_runtime.selftest import cell_requests
    from pd_runtime.transport import TransferError

    from . import faults

    cell = _base(p_tp=1, d_tp=1, lease_s=1.0, requests=1)
    released: list = []
    pr, [(dr, _)] = pair(cell, faults.DroppedReadTransport("d-drop", "cpu", drops=1),
                         on_release=lambda r, why: released.append((r, why)))
    rid, preq, dreq, _ = cell_requests(cell)[0]
    now = [0.0]  # P's lease clock, moved by hand: however slow this machine, no sleeping
    pr.leases.clock = lambda: now[0]
    pr.leases.heartbeat([rid])
    with pytest.raises(TransferError, match="injected"):
        dr.pull(rid, preq, dreq)  # P gathered into a slot; D never reads it
    assert pr.stats()["staging_in_use"] > 0 and released == []
    now[0] = 1.5  # past the lease: P's poller expires it
    assert eventually(lambda: released == [(rid, "expired")]), released
    with pytest.raises(PeerError) as e:
        dr.pull(rid, preq, dreq)  # the lease expired and the blocks are gone
    assert e.value.code == "lease" and "lease expired" in str(e.value)
    st = pr.stats()
    assert st["held"] == 0 and st["staging_in_use"] == 0 and st["expired"] == 1
    assert released == [(rid, "expired")]
    assert rid not in pr.requests


def test_release_waits_for_every_consumer(pair):
    """P TP 1 -> D TP 2: both D ranks read P rank 0; the engine hears `consumed` only after the
    second one finished, and P holds nothing afterwards."""
    import numpy as np

    from pd_runtime.selftest import cell_requests

    cell = _base(p_tp=1, d_tp=2, requests=1)
    released: list = []
    pr, drs = pair(cell, on_release=lambda r, why: released.append((r, why)))
    rid, preq, dreq, _ = cell_requests(cell)[0]
    (d0, want0), (d1, want1) = drs
    d0.pull(rid, preq, dreq)
    assert not eventually(lambda: released, 0.5), released  # D rank 1 has not read yet
    assert pr.stats()["held"] == 1
    d1.pull(rid, preq, dreq)
    assert eventually(lambda: released == [(rid, "consumed")]), released
    assert pr.stats()["held"] == 0 and pr.stats()["staging_in_use"] == 0
    for d, want in drs:
        assert np.array_equal(d.arena.numpy(), want)


def test_unknown_request_is_a_typed_refusal(pair):
    from pd_runtime.protocol import PeerError
    from pd_runtime.selftest import cell_requests

    cell = _base(p_tp=1, d_tp=1, requests=1)
    pr, [(dr, _)] = pair(cell)
    _, preq, dreq, _ = cell_requests(cell)[0]
    with pytest.raises(PeerError) as e:
        dr.pull("never-held", preq, dreq)
    assert e.value.code == "lease" and "unknown request" in str(e.value)


def test_prepare_compares_the_packed_block_tables(pair):
    """PREPARE carries D's copy of P's block tables as packed bytes: one block off is refused
    (lease), the tables P holds pull the expected bytes, and a held request whose tables are not
    integers is a plan refusal."""
    import numpy as np

    from pd_runtime.planner import Request
    from pd_runtime.protocol import PeerError
    from pd_runtime.selftest import cell_requests

    cell = _base(p_tp=1, d_tp=1, requests=1)
    pr, [(dr, want)] = pair(cell)
    rid, preq, dreq, _ = cell_requests(cell)[0]
    g, bt = next(iter(preq.block_tables.items()))
    off = Request(preq.num_tokens, {**preq.block_tables, g: [*bt[:-1], bt[-1] + 1]})
    with pytest.raises(PeerError) as e:
        dr.pull(rid, off, dreq)
    assert e.value.code == "lease" and "block table differs" in str(e.value)
    dr.pull(rid, preq, dreq)
    assert np.array_equal(dr.arena.numpy(), want)
    pr.hold("odd", Request(preq.num_tokens, {g: ["x"] * len(bt)}))
    with pytest.raises(PeerError) as e:
        dr.pull("odd", preq, dreq)
    assert e.value.code == "plan" and "not lists of integers" in str(e.value)


def test_empty_token_refused_before_anything_starts():
    from pd_runtime.protocol import TokenError
    from pd_runtime.selftest import Cell, build_decode, build_prefill

    with pytest.raises(TokenError):
        build_prefill(_base(token=""), 0, "cpu")
    with pytest.raises(TokenError):
        build_decode(Cell(token="  "), 0, "cpu")


def test_a_pull_larger_than_the_receive_buffer_is_refused_before_prepare(pair):
    """DecodeRank(recv_bytes=...) below a request's bytes: the pull is refused by name before
    anything reaches P, and the request stays pullable by a rank with room for it."""
    import numpy as np
    import torch

    from pd_runtime.selftest import cell_requests
    from pd_runtime.transport import TransferError
    from pd_runtime.worker import DecodeRank

    cell = _base(p_tp=1, d_tp=1, requests=1)
    pr, [(dr, want)] = pair(cell)
    rid, preq, dreq, _ = cell_requests(cell)[0]
    small = DecodeRank(dr.spec, cell.factors("d"), cell.token.encode(), "cpu",
                       arena=torch.zeros_like(dr.arena), recv_bytes=4096)
    try:
        small.connect([pr.address])
        with pytest.raises(TransferError, match=r"need \d+ bytes of receive buffer.* has 4096"):
            small.pull(rid, preq, dreq)
        assert pr.stats()["staging_in_use"] == 0 and pr.stats()["held"] == 1
        dr.pull(rid, preq, dreq)
        assert np.array_equal(dr.arena.numpy(), want)
    finally:
        small.close()


# -- gathered at hold(): P stages for the decode geometries connected when it holds a request


def _staged_cells():
    from pd_runtime.selftest import Cell

    shapes = [  # family, P TP, D TP, P block, D block, layouts
        ("dense", 1, 2, 16, 16, ("HND", "NHD")),
        ("mla", 2, 1, 8, 32, ("NHD", "HND")),
        ("sliding", 2, 2, 16, 12, ("HND", "HND")),
        ("hybrid-ssm", 1, 2, 16, 12, ("NHD", "NHD")),
    ]
    return [Cell(family=f, num_kv_heads=4, head_size=8, layers=2, p_tp=pt, d_tp=dt, p_block=pb,
                 d_block=db, p_layout=lay[0], d_layout=lay[1], dtype="bfloat16", tokens=45,
                 requests=2, seed=300 + i, sliding_window=19, timeout_s=20)
            for i, (f, pt, dt, pb, db, lay) in enumerate(shapes)]


@pytest.fixture
def connected():
    """(make(cell, **prefill_kw) -> (P ranks, [(D rank, want)])): every D rank connected to every
    P rank before any request is held."""
    from pd_runtime.selftest import build_decode, build_prefill

    made: list = []

    def make(cell, **kw):
        kw.setdefault("stage_at_hold", True)  # on CUDA by default; here the CPU
        prs = [build_prefill(cell, r, "cpu", hold_requests=False, **kw) for r in range(cell.p_tp)]
        made.extend(prs)
        drs = []
        for r in range(cell.d_tp):
            dr, want = build_decode(cell, r, "cpu")
            made.append(dr)
            dr.connect([p.address for p in prs])
            drs.append((dr, want))
        return prs, drs

    yield make
    for obj in reversed(made):
        obj.close()


def _hold_all(prs, cell):
    from pd_runtime.selftest import cell_requests

    for rid, preq, _, _ in cell_requests(cell):
        for p in prs:
            p.hold(rid, preq)


def _pull_all(drs, cell, settle=()) -> None:
    """Every D rank pulls every request; with `settle` (P ranks), each pull waits until P freed
    the slot the last one read (a READ notification frees it, asynchronously)."""
    import numpy as np

    from pd_runtime.selftest import cell_requests

    for dr, want in drs:
        for rid, preq, dreq, _ in cell_requests(cell):
            dr.pull(rid, preq, dreq)
            assert eventually(lambda: all(p.stats()["staging_in_use"] == p.stats()["staged_bytes"]
                                          for p in settle)), [p.stats() for p in settle]
        assert np.array_equal(dr.arena.numpy(), want)


@pytest.mark.parametrize("cell", _staged_cells(), ids=lambda c: f"{c.family}-p{c.p_tp}-d{c.d_tp}")
def test_gathered_at_hold_pulls_the_same_bytes(connected, cell):
    """Every PREPARE claims the slot P gathered at hold(), D's arena is byte-exact, and P holds
    nothing once every consumer finished."""
    prs, drs = connected(cell)
    _hold_all(prs, cell)
    assert sum(p.stats()["staged_bytes"] for p in prs) > 0  # MLA: D reads one P rank of two
    _pull_all(drs, cell)
    prepares = cell.requests * sum(len(dr._pairs(dr.p_pool)) for dr, _ in drs)
    assert sum(p.stats()["staged_claims"] for p in prs) == prepares
    assert eventually(lambda: all(p.stats()["held"] == 0 and p.stats()["staging_in_use"] == 0
                                  for p in prs)), [p.stats() for p in prs]
    assert all(p.stats()["stage_failures"] == 0 for p in prs)


def test_gather_at_hold_off_and_when_staging_is_short(connected, monkeypatch):
    """PD_RUNTIME_STAGE_AT_HOLD=0 (the CPU's default), or a staging region where a staged slot
    would leave less than half free: nothing is staged, PREPARE gathers, the bytes are the same."""
    cell = _staged_cells()[0]
    monkeypatch.delenv("PD_RUNTIME_STAGE_AT_HOLD", raising=False)
    prs, drs = connected(cell, stage_at_hold=None)
    _hold_all(prs, cell)
    assert prs[0].stats()["staged_bytes"] == 0
    _pull_all(drs, cell)
    assert prs[0].stats()["staged_claims"] == 0
    from pd_runtime.lease import ALIGN
    from pd_runtime.selftest import cell_requests
    from pd_runtime.template import PairTemplate

    p, d = cell.pools()
    T = cell_requests(cell)[0][1].num_tokens
    slot = -(-PairTemplate(p.with_rank(0), d.with_rank(0)).nbytes(T) // ALIGN) * ALIGN
    # three slots: the first staged one leaves two free, more would leave less than half
    prs, drs = connected(cell, staging_bytes=3 * slot)
    _hold_all(prs, cell)
    assert prs[0].stats()["staged_bytes"] == slot
    _pull_all(drs, cell, settle=prs)
    assert prs[0].stats()["staged_claims"] == 1


def test_a_decode_that_went_away_is_not_staged_for(connected):
    cell = _staged_cells()[0]
    prs, drs = connected(cell)
    for dr, _ in drs:
        dr.close()
    assert eventually(lambda: not prs[0]._consumers), prs[0]._consumers
    _hold_all(prs, cell)
    assert prs[0].stats()["staged_bytes"] == 0


def test_a_failed_table_upload_drains_the_prepare_it_overlapped(pair, monkeypatch):
    """D uploads its tables while P answers PREPARE: when the upload fails, P's reply is still
    read (the connection stays in step), and the next pull of the request succeeds."""
    import numpy as np

    from pd_runtime import worker
    from pd_runtime.selftest import cell_requests

    cell = _base(p_tp=1, d_tp=1, requests=1)
    pr, [(dr, want)] = pair(cell)
    rid, preq, dreq, _ = cell_requests(cell)[0]
    real = worker.upload_all

    def broken(*a, **k):
        monkeypatch.setattr(worker, "upload_all", real)  # fails once
        raise RuntimeError("injected upload failure")

    monkeypatch.setattr(worker, "upload_all", broken)
    with pytest.raises(RuntimeError, match="injected upload failure"):
        dr.pull(rid, preq, dreq)
    dr.pull(rid, preq, dreq)
    assert np.array_equal(dr.arena.numpy(), want)


def test_decode_tables_are_checked_before_prepare(pair):
    """A D block table that does not fit D's pool is refused before anything reaches P."""
    from pd_runtime.planner import PlanError, Request
    from pd_runtime.selftest import cell_requests

    cell = _base(p_tp=1, d_tp=1, requests=1)
    pr, [(dr, _)] = pair(cell)
    rid, preq, dreq, _ = cell_requests(cell)[0]
    g, bt = next(iter(dreq.block_tables.items()))
    bad = Request(dreq.num_tokens, {**dreq.block_tables, g: [*bt[:-1], 10**9]})
    with pytest.raises(PlanError):
        dr.pull(rid, preq, bad)
    assert pr.stats()["staging_in_use"] == 0 and pr.stats()["held"] == 1


def test_a_failed_gather_at_hold_leaves_the_request_held(connected, monkeypatch):
    """Whatever breaks the gather at hold() (here: an injected error), hold() succeeds, the
    failure is counted, and PREPARE gathers instead: the bytes are the same."""
    from pd_runtime.worker import PrefillRank

    def broken(self, *a):
        raise RuntimeError("injected staging failure")

    cell = _staged_cells()[0]
    prs, drs = connected(cell)
    monkeypatch.setattr(PrefillRank, "_stage", broken)
    _hold_all(prs, cell)
    assert prs[0].stats()["stage_failures"] == cell.requests
    assert prs[0].stats()["held"] == cell.requests and prs[0].stats()["staged_bytes"] == 0
    _pull_all(drs, cell)
