"""The template kernel's Triton code on the CPU (Triton's interpreter, TRITON_INTERPRET=1, in a
child process so this session's Triton stays compiled): it gives the planner's bytes, gather and
scatter, for every model family and the layouts the engine uses (HND and NHD on either side,
several entity kinds in one class)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

CHILD = r"""
import sys
import numpy as np
import torch
from pd_runtime.kernels.kvcopy import KVProgram
from pd_runtime.kvcache import ModelSpec, RankSpec
from tests.helpers import kv_pairs, kv_requests

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
    preq, dreq = kv_requests(p, d, T, np.random.default_rng(11))
    for c in kv_pairs(p, d, preq, dreq):
        tm = c.template
        slot = torch.full(c.want_slot.shape, 0x5A, dtype=torch.uint8)
        g = KVProgram(tm.gather, "cpu", True, use_triton=True)
        s = KVProgram(tm.scatter, "cpu", False, use_triton=True)
        g.run(torch.from_numpy(c.p_arena), slot, tm.dyn("prefill", preq, T), 256)
        assert np.array_equal(slot.numpy(), c.want_slot), (geo, "gather")
        got = torch.from_numpy(c.d_arena.copy())
        s.run(slot, got, tm.dyn("decode", dreq, T), 256)
        assert np.array_equal(got.numpy(), c.want), (geo, "scatter")
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
def test_triton_kernel_interpreted_byte_exact(family, cache):
    path = os.pathsep.join([str(ROOT / "runtime"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    r = subprocess.run([sys.executable, "-c", CHILD, family, cache, "45"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "checked" in r.stdout and int(r.stdout.split("checked")[1]) >= 6, r.stdout
