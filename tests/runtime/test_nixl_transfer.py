"""P ranks and D ranks as separate processes over NIXL/UCX host memory, byte-exact.

One pool of worker processes runs every cell (families x TP directions x block relations x
layout pairs x dtypes) so Python and NIXL start only a few times. Failure tests: hash mismatch,
bad token, a prefill process killed mid-transfer, lease expiry.
"""

from __future__ import annotations

import itertools

import pytest

try:
    from pd_runtime.transport import import_nixl

    import_nixl()
    NIXL_ERR = None
except Exception as e:  # noqa: BLE001
    NIXL_ERR = str(e)

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
    from pd_runtime.transfer_test import Cell

    import os

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
    from pd_runtime.transfer_test import Pool

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
    from pd_runtime.transfer_test import Cell

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


def test_prefill_killed_mid_transfer(pool):
    r = pool.run_cell(_base(p_tp=1, d_tp=1, fault="p_die_after_prepare", timeout_s=5))
    assert not r["ok"]
    (e,) = r["decode"]
    assert e["error"] in ("TransferError", "HandshakeError", "PeerError"), e
    assert r["prefill"][0].get("dead")
    # the pool replaces the dead process; the next cell works
    r2 = pool.run_cell(_base(p_tp=1, d_tp=1, seed=78))
    assert r2["ok"], r2


def test_lease_expiry_frees_everything(pool):
    r = pool.run_cell(_base(p_tp=1, d_tp=1, fault="d_skip_read_then_retry", lease_s=1.0, requests=1))
    (e,) = r["decode"]
    assert e["error"] == "PeerError" and "lease expired" in e["message"], e
    (ps,) = r["prefill"]
    assert ps["held"] == 0 and ps["staging_in_use"] == 0 and ps["expired"] == 1
