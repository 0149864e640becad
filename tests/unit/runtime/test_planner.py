"""Property tests: the planner's byte segments, executed naively, give exactly the KV the
brute-force reference expects on every decode rank, for random geometry pairs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pd_runtime.kvcache import (
    GROUP_STATE,
    GeometryError,
    ModelSpec,
    RankSpec,
    groups_of,
    live_token_range,
    make_block_table,
    model_components,
)
from pd_runtime.planner import (
    PlanError,
    Request,
    expected_consumers,
    plan_d_rank,
    readers_of,
    release_assignments,
)
from pd_runtime.reference import (
    apply_segments,
    expected_decode_arena,
    random_arena,
    random_logical,
    store,
)


def make_request(spec: RankSpec, T: int, rng: np.random.Generator) -> Request:
    tables = {}
    for g in groups_of(spec.model):
        pool = spec.num_state_slots if g == GROUP_STATE else spec.num_blocks
        ids = [int(x) for x in rng.permutation(pool)]
        tables[g] = make_block_table(spec.model, g, T, spec.block_size, ids)
    return Request(T, tables)


def run_transfer(p_pool: RankSpec, d_pool: RankSpec, T: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    logical = random_logical(p_pool, T, seed + 1)
    p_req = make_request(p_pool, T, rng)
    d_req = make_request(d_pool, T, rng)
    p_arenas = []
    for r in range(p_pool.tp_size):
        a = random_arena(p_pool.with_rank(r), seed + 100 + r)
        store(p_pool.with_rank(r), a, p_req, logical)
        p_arenas.append(a)
    for dr in range(d_pool.tp_size):
        d = d_pool.with_rank(dr)
        init = random_arena(d, seed + 200 + dr)
        want = expected_decode_arena(d, init, d_req, logical)
        got = init.copy()
        plan = plan_d_rank(p_pool, d, p_req, d_req)
        rows_read = 0
        for pr, pp in plan.peers.items():
            slot = np.full(pp.nbytes + 7, 0xA5, np.uint8)
            apply_segments(p_arenas[pr], slot, pp.gather)
            assert pp.gather.nbytes == pp.nbytes == pp.scatter.nbytes
            apply_segments(slot[: pp.nbytes], got, pp.scatter)
            assert (slot[pp.nbytes :] == 0xA5).all()
            rows_read += pp.rows
        np.testing.assert_array_equal(got, want)
        # each needed (position, head, component) row is read exactly once
        need = 0
        from pd_runtime.kvcache import arena_layout

        for pl in arena_layout(d).placements:
            if pl.comp.paged:
                lo, hi = live_token_range(d.model, pl.comp.group, T)
            else:
                lo, hi = 0, pl.comp.state_len
            need += (hi - lo) * len(pl.heads)
        assert rows_read == need
    # every P rank is either read or released, and consumer counts add up
    readers = readers_of(p_pool, d_pool)
    released = release_assignments(p_pool, d_pool)
    for pr in range(p_pool.tp_size):
        rel = sum(pr in v for v in released.values())
        assert (len(readers[pr]) > 0) != (rel == 1)
        assert expected_consumers(p_pool, d_pool, pr) == max(1, len(readers[pr]))


FAMILIES = ["dense", "mla", "sliding", "hybrid-ssm"]


@st.composite
def pairings(draw):
    family = draw(st.sampled_from(FAMILIES))
    heads = draw(st.sampled_from([1, 2, 4, 6]))
    tps = [t for t in (1, 2, 3, 4, 6)
           if (t <= heads and heads % t == 0) or (t > heads and t % heads == 0)]
    if family in ("hybrid-ssm",):
        tps = [t for t in tps if t in (1, 2)]
    p_tp = draw(st.sampled_from(tps))
    d_tp = draw(st.sampled_from(tps))
    cache = draw(st.sampled_from(["auto", "fp8"]))
    m = ModelSpec(
        family=family,
        num_layers=draw(st.integers(1, 3)),
        num_kv_heads=heads,
        head_size=draw(st.sampled_from([4, 8])),
        dtype=draw(st.sampled_from(["bfloat16", "float16"])),
        cache_dtype=cache,
        kv_lora_rank=8,
        rope_dim=4,
        sliding_window=draw(st.integers(1, 40)) if family == "sliding" else 0,
        ssm_heads=2,
        ssm_head_dim=4,
        ssm_groups=draw(st.sampled_from([1, 2])),
        d_state=4,
        conv_kernel=4,
    )
    T = draw(st.integers(1, 70))
    pb = draw(st.sampled_from([1, 2, 3, 4, 8, 16]))
    db = draw(st.sampled_from([1, 2, 3, 4, 5, 8, 16, 32]))
    nb_p = (T + pb - 1) // pb + draw(st.integers(0, 3))
    nb_d = (T + db - 1) // db + draw(st.integers(0, 3))
    p = RankSpec(m, p_tp, 0, pb, draw(st.sampled_from(["HND", "NHD"])), nb_p, 3)
    d = RankSpec(m, d_tp, 0, db, draw(st.sampled_from(["HND", "NHD"])), nb_d, 3)
    return p, d, T, draw(st.integers(0, 2**31))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pairings())
def test_plan_matches_brute_force(case):
    p, d, T, seed = case
    run_transfer(p, d, T, seed)


@pytest.mark.parametrize(
    "family,heads,p_tp,d_tp,pb,db,pl,dl",
    [
        ("dense", 8, 1, 2, 16, 16, "HND", "HND"),  # head split
        ("dense", 8, 4, 1, 16, 16, "NHD", "HND"),  # head merge
        ("dense", 2, 4, 1, 16, 16, "HND", "NHD"),  # P replicated, P > D (vLLM rejects)
        ("dense", 2, 1, 8, 16, 48, "HND", "NHD"),  # D replicated, block x3, permute
        ("dense", 6, 2, 3, 16, 10, "HND", "HND"),  # non-divisible TP pair, arbitrary blocks
        ("mla", 1, 4, 2, 16, 64, "HND", "HND"),  # MLA read once
        ("mla", 1, 2, 4, 64, 16, "NHD", "NHD"),
        ("sliding", 4, 2, 2, 16, 32, "HND", "NHD"),
        ("hybrid-ssm", 4, 2, 1, 16, 16, "HND", "HND"),
        ("hybrid-ssm", 4, 1, 2, 8, 16, "HND", "NHD"),
    ],
)
@pytest.mark.parametrize("cache", ["auto", "fp8"])
def test_named_cells(family, heads, p_tp, d_tp, pb, db, pl, dl, cache):
    m = ModelSpec(family=family, num_layers=3, num_kv_heads=heads, head_size=8, cache_dtype=cache,
                  kv_lora_rank=16, rope_dim=8, sliding_window=21, ssm_heads=4, ssm_groups=2,
                  d_state=4, ssm_head_dim=4)
    p = RankSpec(m, p_tp, 0, pb, pl, 12, 4)
    d = RankSpec(m, d_tp, 0, db, dl, 12, 4)
    run_transfer(p, d, 83, 7)


def test_mla_read_once_and_release():
    m = ModelSpec(family="mla", num_layers=2, kv_lora_rank=16, rope_dim=8)
    p = RankSpec(m, 4, 0, 16, "HND", 8)
    d = RankSpec(m, 2, 0, 16, "HND", 8)
    readers = readers_of(p, d)
    assert sum(1 for r in readers.values() if r) == 2  # each D rank reads one P rank
    rel = release_assignments(p, d)
    assert sorted(rel[0] + rel[1]) == [pr for pr, r in readers.items() if not r]


def test_head_split_descriptor_is_one_contiguous_range():
    m = ModelSpec(num_layers=4, num_kv_heads=8, head_size=128)
    p = RankSpec(m, 1, 0, 16, "HND", 256)
    d = RankSpec(m, 2, 1, 16, "NHD", 256)
    rng = np.random.default_rng(0)
    T = 1000
    plan = plan_d_rank(p, d, make_request(p, T, rng), make_request(d, T, rng))
    (pp,) = plan.peers.values()
    assert pp.nbytes == 4 * 4 * T * 512  # layers x heads x tokens x (K+V) bytes
    # gather rows merge into runs of whole blocks of one head (HND on P)
    assert pp.gather.count == 4 * 4 * 63


def test_errors_name_the_problem():
    m = ModelSpec(num_kv_heads=8)
    with pytest.raises(GeometryError, match="TP 3"):
        RankSpec(m, 3, 0)
    p = RankSpec(m, 1, 0, 16, "HND", 4)
    d = RankSpec(ModelSpec(num_kv_heads=8, head_size=64), 1, 0, 16, "HND", 4)
    with pytest.raises(PlanError, match="head_size"):
        plan_d_rank(p, d, Request(10, {0: [0]}), Request(10, {0: [0]}))
    d = RankSpec(m, 1, 0, 16, "HND", 4)
    with pytest.raises(PlanError, match="outside"):
        plan_d_rank(p, d, Request(10, {0: [7]}), Request(10, {0: [0]}))
    with pytest.raises(PlanError, match="blocks"):
        plan_d_rank(p, d, Request(40, {0: [0, 1, 2]}), Request(40, {0: [0]}))


def test_components_shapes_match_vllm():
    m = ModelSpec(num_layers=2, num_kv_heads=8, head_size=128, cache_dtype="fp8")
    comps = model_components(m)
    assert [c.name for c in comps] == ["kv", "kv_scale", "kv", "kv_scale"]
    assert comps[0].row_bytes == 256  # fp8 K + V
    from pd_runtime.kvcache import arena_layout

    a = arena_layout(RankSpec(m, 2, 1, 16, "HND", 10))
    assert a.placements[0].shape == (10, 4, 16, 256)
    a = arena_layout(RankSpec(m, 2, 1, 16, "NHD", 10))
    assert a.placements[0].shape == (10, 16, 4, 256)
