"""The template kernels' Triton code on the CPU (Triton's interpreter, TRITON_INTERPRET=1, in a
child process so this session's Triton stays compiled): the v1 and v2 kernels give the planner's
bytes, gather and scatter, for every model family and the layouts the engine uses (merged NHD
rows, several entity kinds in one class, v2 with its compile-time block size / kind and with
both read per entity); and the row merge itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pd_runtime.kernels.kvcopy import KVProgram, merge_rows
from pd_runtime.kvcache import ModelSpec, RankSpec
from pd_runtime.template import C_SIZE, PairTemplate

ROOT = Path(__file__).resolve().parents[3]

CHILD = r"""
import sys
import numpy as np
import torch
from pd_runtime.kernels.kvcopy import KVProgram
from pd_runtime.kvcache import GROUP_STATE, ModelSpec, RankSpec, groups_of, make_block_table
from pd_runtime.planner import Request, plan_d_rank
from pd_runtime.reference import apply_segments, random_arena
from pd_runtime.template import PairTemplate

family, cache, T = sys.argv[1], sys.argv[2], int(sys.argv[3])
geos = [(1, 1, 16, 16, "HND", "HND"), (1, 2, 16, 32, "HND", "NHD"), (2, 1, 16, 12, "NHD", "HND"),
        (2, 2, 8, 8, "NHD", "NHD")]
m = ModelSpec(family=family, num_layers=2, num_kv_heads=4, head_size=16, cache_dtype=cache,
              sliding_window=21 if family == "sliding" else 0, kv_lora_rank=32, rope_dim=16)
checked = 0
for geo in geos:
    p_tp, d_tp, pb, db, pl, dl = geo
    p = RankSpec(m, p_tp, 0, pb, pl, (T + pb - 1) // pb + 3)
    d = RankSpec(m, d_tp, 0, db, dl, (T + db - 1) // db + 3)
    rng = np.random.default_rng(11)

    def req(spec):
        tabs = {}
        for g in groups_of(m):
            pool = spec.num_state_slots if g == GROUP_STATE else spec.num_blocks
            tabs[g] = make_block_table(m, g, T, spec.block_size,
                                       [int(x) for x in rng.permutation(pool)])
        return Request(T, tabs)

    preq, dreq = req(p), req(d)
    for dr in range(d_tp):
        dd = d.with_rank(dr)
        plan = plan_d_rank(p, dd, preq, dreq)
        for pr, pp in plan.peers.items():
            tm = PairTemplate(p.with_rank(pr), dd)
            pa = random_arena(p.with_rank(pr), 3 + pr)
            want_slot = np.full(pp.nbytes + 512, 0x5A, np.uint8)
            apply_segments(pa, want_slot, pp.gather.shifted(dst_by=256))
            da = random_arena(dd, 9 + dr)
            want = da.copy()
            apply_segments(want_slot[256 : 256 + pp.nbytes], want, pp.scatter)
            for kernel in ("v1", "v2", "v2 generic"):
                slot = torch.full((pp.nbytes + 512,), 0x5A, dtype=torch.uint8)
                k = kernel.split()[0]
                g = KVProgram(tm.gather, "cpu", True, use_triton=True, kernel=k)
                s = KVProgram(tm.scatter, "cpu", False, use_triton=True, kernel=k)
                if kernel == "v2 generic":  # block size and kind read per entity
                    for c in g.classes + s.classes:
                        c.bs, c.kind = 0, -1
                g.run(torch.from_numpy(pa), slot, tm.dyn("prefill", preq, T), 256)
                assert np.array_equal(slot.numpy(), want_slot), (geo, kernel, "gather")
                got = torch.from_numpy(da.copy())
                s.run(slot, got, tm.dyn("decode", dreq, T), 256)
                assert np.array_equal(got.numpy(), want), (geo, kernel, "scatter")
                checked += 1
print("checked", checked)
"""


def _have_triton() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(not _have_triton(), reason="triton is not installed")
@pytest.mark.parametrize("family,cache", [("dense", "auto"), ("dense", "fp8"), ("mla", "fp8"),
                                          ("sliding", "auto"), ("hybrid-ssm", "auto")])
def test_triton_kernels_interpreted_byte_exact(family, cache):
    path = os.pathsep.join([str(ROOT / "runtime"), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    r = subprocess.run([sys.executable, "-c", CHILD, family, cache, "45"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "checked" in r.stdout and int(r.stdout.split("checked")[1]) >= 12, r.stdout


FALLBACK_CHILD = r"""
import warnings
import numpy as np
import pytest
import torch
from pd_runtime.kernels import kvcopy
from pd_runtime.kvcache import ModelSpec, RankSpec
from pd_runtime.planner import Request, plan_d_rank
from pd_runtime.reference import apply_segments, random_arena
from pd_runtime.template import PairTemplate

m = ModelSpec(num_layers=2, num_kv_heads=4, head_size=16)
p, d = RankSpec(m, 2, 0, 4, "NHD", 12), RankSpec(m, 1, 0, 8, "HND", 8)
T = 30
preq = Request(T, {0: list(range(11, 3, -1))})
dreq = Request(T, {0: [7, 1, 5, 3]})
pp = plan_d_rank(p, d, preq, dreq).peers[0]
tm = PairTemplate(p, d)
pa = random_arena(p, 1)
want = np.full(pp.nbytes, 0x5A, np.uint8)
apply_segments(pa, want, pp.gather)


def broken(*a, **k):
    raise RuntimeError("no v2 here")


kvcopy.KVProgram._launch2 = broken
strict = kvcopy.KVProgram(tm.gather, "cpu", True, use_triton=True)
strict.fallback = False
with pytest.raises(RuntimeError, match="no v2 here"):
    strict.run(torch.from_numpy(pa), torch.zeros(pp.nbytes, dtype=torch.uint8),
               tm.dyn("prefill", preq, T))
assert kvcopy.FALLBACKS == []
prog = kvcopy.KVProgram(tm.gather, "cpu", True, use_triton=True)
slot = torch.full((pp.nbytes,), 0x5A, dtype=torch.uint8)
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    prog.run(torch.from_numpy(pa), slot, tm.dyn("prefill", preq, T))
assert prog.kernel == "v1" and kvcopy.FALLBACKS == ["RuntimeError: no v2 here"]
assert any("uses v1" in str(x.message) for x in w)
assert np.array_equal(slot.numpy(), want)
print("fallback ok")
"""


@pytest.mark.skipif(not _have_triton(), reason="triton is not installed")
def test_v2_build_failure_falls_back_to_v1():
    """A v2 build failure (raised at the launch, before anything moves) warns, is recorded and
    runs v1 on the same merged tables, bytes exact; with fallback off it raises."""
    path = os.pathsep.join([str(ROOT / "runtime"), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path, PD_RUNTIME_KV_KERNEL="v2")
    r = subprocess.run([sys.executable, "-c", FALLBACK_CHILD], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "fallback ok" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


def test_merge_rows_nhd_heads():
    """P TP2 NHD -> D TP1: P's four local heads of a layer sit side by side in a token's row and
    in the staging row; v2 moves them as one 2 KiB row, the same bytes as v1's four rows."""
    m = ModelSpec(num_layers=3, num_kv_heads=8, head_size=128)
    p = RankSpec(m, 2, 0, 16, "NHD", 20)
    d = RankSpec(m, 1, 0, 16, "HND", 20)
    tm = PairTemplate(p, d)
    ent = tm.gather.ent
    merged = merge_rows(ent)
    assert merged.shape[0] * 4 == ent.shape[0]
    assert set(merged[:, C_SIZE]) == {4 * int(ent[0, C_SIZE])}
    # the byte moves are the same set: expand both tables to (src, dst) byte pairs for one
    # request and compare
    v1 = KVProgram(tm.gather, "cpu", True, use_triton=False, kernel="v1")
    v2 = KVProgram(tm.gather, "cpu", True, use_triton=False, kernel="v2")
    assert sum(c.n for c in v2.classes) * 4 == sum(c.n for c in v1.classes)
    import torch

    from pd_runtime.planner import Request

    rng = np.random.default_rng(2)
    T = 37
    req = Request(T, {0: [int(x) for x in rng.permutation(p.num_blocks)]})
    src = torch.from_numpy(rng.integers(0, 256, 20 * 16 * 4 * 512 * 6, dtype=np.uint8))
    outs = []
    for prog in (v1, v2):
        dst = torch.full((tm.nbytes(T) + 64,), 7, dtype=torch.uint8)
        prog.run(src, dst, tm.dyn("prefill", req, T), 64)
        outs.append(dst.numpy())
    assert np.array_equal(outs[0], outs[1]) and (outs[0][64:] != 7).mean() > 0.9


def test_merge_rows_keeps_apart_what_is_not_adjacent():
    """HND heads (a head's rows are a block apart) and rows of different widths stay apart; a
    run of three merges as two + one (row widths stay powers of two)."""
    m = ModelSpec(num_layers=2, num_kv_heads=4, head_size=64)
    p = RankSpec(m, 1, 0, 16, "HND", 8)
    tm = PairTemplate(p, p)
    assert merge_rows(tm.gather.ent).shape == tm.gather.ent.shape
    e = np.zeros((3, tm.gather.ent.shape[1]), np.int64)
    e[:, C_SIZE] = 64
    e[:, 3] = [0, 64, 128]  # C_CK
    e[:, 5] = [1000, 1064, 1128]  # C_PBASE
    out = merge_rows(e)
    assert out[:, C_SIZE].tolist() == [128, 64] and out[:, 5].tolist() == [1000, 1128]
