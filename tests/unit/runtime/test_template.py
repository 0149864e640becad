"""The per-geometry templates + device-address kernels (torch path) move exactly the bytes the
planner's segments move: same slot bytes after the gather (nothing outside the slot touched),
same decode arena after the scatter, same byte and row counts, for random geometry pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from test_planner import make_request, pairings  # noqa: E402 (rootdir-relative, no packages)

from pd_runtime.kernels.kvcopy import program_for
from pd_runtime.kvcache import ModelSpec, RankSpec
from pd_runtime.planner import PlanError, Request, plan_d_rank
from pd_runtime.reference import apply_segments, random_arena
from pd_runtime.template import PairTemplate, TemplateCache


def check_case(p, d, T, seed):
    rng = np.random.default_rng(seed)
    preq, dreq = make_request(p, T, rng), make_request(d, T, rng)
    for dr in range(d.tp_size):
        dd = d.with_rank(dr)
        plan = plan_d_rank(p, dd, preq, dreq)
        for pr in range(p.tp_size):
            pp = plan.peers.get(pr)
            tm = PairTemplate(p.with_rank(pr), dd)
            if pp is None:
                assert tm.empty or tm.nbytes(T) == 0
                continue
            assert tm.nbytes(T) == pp.nbytes and tm.rows(T) == pp.rows
            pa = random_arena(p.with_rank(pr), seed % 1000 + pr)
            slot = np.full(pp.nbytes + 512, 0xA5, np.uint8)
            want_slot = slot.copy()
            apply_segments(pa, want_slot, pp.gather.shifted(dst_by=256))
            st = torch.from_numpy(slot)
            dyn = tm.dyn("prefill", preq, T)
            program_for(tm.gather, "cpu", True).run(torch.from_numpy(pa), st, dyn, 256)
            np.testing.assert_array_equal(slot, want_slot)
            da = random_arena(dd, seed % 977 + dr)
            want = da.copy()
            apply_segments(slot[256 : 256 + pp.nbytes], want, pp.scatter)
            dyn = tm.dyn("decode", dreq, T)
            program_for(tm.scatter, "cpu", False).run(st, torch.from_numpy(da), dyn, 256)
            np.testing.assert_array_equal(da, want)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pairings())
def test_template_matches_planner(case):
    check_case(*case)


@pytest.mark.parametrize("geo", [(1, 2, 16, 32, "HND", "NHD"), (2, 1, 16, 12, "NHD", "HND"),
                                 (4, 8, 8, 8, "HND", "HND")])
def test_llama_like_geometries(geo):
    p_tp, d_tp, pb, db, pl, dl = geo
    m = ModelSpec(num_layers=2, num_kv_heads=8, head_size=16, cache_dtype="fp8")
    T = 77
    p = RankSpec(m, p_tp, 0, pb, pl, T // pb + 4)
    d = RankSpec(m, d_tp, 0, db, dl, T // db + 4)
    check_case(p, d, T, 5)


def test_template_errors_name_the_problem():
    m = ModelSpec(num_layers=1, num_kv_heads=2, head_size=4)
    p = RankSpec(m, 1, 0, 4, "HND", 8)
    d = RankSpec(m, 1, 0, 4, "HND", 8)
    tm = TemplateCache().get(p, d)
    with pytest.raises(PlanError, match="3 needed"):
        tm.dyn("prefill", Request(10, {0: [0]}), 10)
    with pytest.raises(PlanError, match="block id 9"):
        tm.dyn("decode", Request(10, {0: [0, 9, 1]}), 10)
    with pytest.raises(PlanError, match="no block table"):
        tm.dyn("decode", Request(10, {}), 10)
    with pytest.raises(PlanError, match="not a list of 64-bit integers"):
        tm.dyn("decode", Request(10, {0: [0, 1.5, 2]}), 10)
    # the same checks on int64 arrays (what the worker passes) and on long tables
    with pytest.raises(PlanError, match="block id 9"):
        tm.dyn("decode", Request(10, {0: np.array([0, 9, 1])}), 10)
    big = RankSpec(m, 1, 0, 4, "HND", 700)
    tb = TemplateCache().get(big, big)
    with pytest.raises(PlanError, match="block id -1"):
        tb.dyn("prefill", Request(2400, {0: list(range(599)) + [-1]}), 2400)
    ok = list(range(699, 99, -1))
    a, b = tb.dyn("decode", Request(2400, {0: ok}), 2400), tb.dyn(
        "decode", Request(2400, {0: np.array(ok)}), 2400)
    assert a.tables.dtype == np.int64 and np.array_equal(a.tables, b.tables)


def test_block_tables_travel_packed():
    """PREPARE carries P's block tables as int64 bytes; they come back as the same ids."""
    from pd_runtime.protocol import ProtocolError, WireRequest
    from pd_runtime.worker import req_from_wire, req_to_wire

    req = Request(40, {0: [5, 0, 7, 1 << 40], 2: [3], 1: [-1, -1, 4]})
    w = req_to_wire(req)
    assert w.block_tables[0] == np.array([5, 0, 7, 1 << 40], "<i8").tobytes()
    assert req_from_wire(w) == req
    with pytest.raises(ProtocolError, match="not whole int64s"):
        req_from_wire(WireRequest(1, {0: b"\x01" * 9}))
