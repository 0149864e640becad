"""GPU: both template kernels (v1, the previous one; v2, the default) and v2's launch settings
give the planner's bytes at the Llama-3-8B head geometry (8 KV heads of 128, bf16) for the four
cases the transfer bench times: equal TP, head split, HND -> NHD scatter with a block-size
change, NHD head merge. Outputs start poisoned; the reference is the planner's segments (numpy).
Skips cleanly without CUDA."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

SETTINGS = {
    "v1": dict(kernel="v1"),
    "v2": dict(kernel="v2"),
    "v2 generic": dict(kernel="v2", generic=True),  # block size and kind read per entity
    "v2 no merge, tile-fast grid": dict(kernel="v2", merge=False, ent_fast=False),
    "v2 16K tile, 8 warps": dict(kernel="v2", tile_bytes=16384, num_warps=8),
    "v2 64K tile": dict(kernel="v2", tile_bytes=65536),
}


def _prog(side, gather, cfg):
    from pd_runtime.kernels.kvcopy import KVProgram

    kp = KVProgram(side, "cuda", gather, use_triton=True, kernel=cfg["kernel"],
                   merge=cfg.get("merge"))
    for k in ("tile_bytes", "num_warps", "ent_fast"):
        if k in cfg:
            setattr(kp, k, cfg[k])
    kp.fallback = False
    if cfg.get("generic"):
        for c in kp.classes:
            c.bs, c.kind = 0, -1
    return kp


@pytest.mark.parametrize("geo", [(1, 1, 16, 16, "HND", "HND"), (1, 2, 16, 16, "HND", "HND"),
                                 (1, 2, 16, 32, "HND", "NHD"), (2, 1, 16, 16, "NHD", "HND")])
def test_kernel_settings_byte_exact(geo):
    from pd_runtime.kvcache import ModelSpec, RankSpec
    from pd_runtime.planner import Request, plan_d_rank
    from pd_runtime.reference import apply_segments, random_arena
    from pd_runtime.template import PairTemplate

    p_tp, d_tp, pb, db, pl, dl = geo
    m = ModelSpec(num_layers=4, num_kv_heads=8, head_size=128)
    T = 1333  # not a multiple of any tile: the last tile of every entity is partial
    p = RankSpec(m, p_tp, 0, pb, pl, (T + pb - 1) // pb + 5)
    d = RankSpec(m, d_tp, 0, db, dl, (T + db - 1) // db + 5)
    rng = np.random.default_rng(5)
    preq = Request(T, {0: [int(x) for x in rng.permutation(p.num_blocks)]})
    dreq = Request(T, {0: [int(x) for x in rng.permutation(d.num_blocks)]})
    checked = 0
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
            pa_d = torch.from_numpy(pa).cuda()
            for name, cfg in SETTINGS.items():
                slot = torch.full((pp.nbytes + 512,), 0x5A, dtype=torch.uint8, device="cuda")
                _prog(tm.gather, True, cfg).run(pa_d, slot, tm.dyn("prefill", preq, T), 256)
                got = torch.from_numpy(da).cuda()
                _prog(tm.scatter, False, cfg).run(slot, got, tm.dyn("decode", dreq, T), 256)
                torch.cuda.synchronize()
                assert np.array_equal(slot.cpu().numpy(), want_slot), (name, "gather")
                assert np.array_equal(got.cpu().numpy(), want), (name, "scatter")
                checked += 1
    assert checked == len(SETTINGS) * max(1, p_tp // d_tp) * d_tp


def test_default_program_builds_v2_without_falling_back():
    """program_for's default (what the worker runs) is v2 on CUDA, and it builds here: no
    fallback to v1 was recorded (by this test or any test before it in this process)."""
    from pd_runtime.kernels import kvcopy
    from pd_runtime.kvcache import ModelSpec, RankSpec
    from pd_runtime.planner import Request
    from pd_runtime.template import PairTemplate

    m = ModelSpec(num_layers=2, num_kv_heads=8, head_size=128)
    p = RankSpec(m, 2, 0, 16, "NHD", 12)
    d = RankSpec(m, 1, 0, 16, "HND", 12)
    tm = PairTemplate(p, d)
    prog = kvcopy.program_for(tm.gather, "cuda", True)
    assert prog.use_triton and prog.kernel == kvcopy.KV_KERNEL
    T = 100
    src = torch.randint(0, 256, (12 * 16 * 4 * 512 * 4,), dtype=torch.uint8, device="cuda")
    dst = torch.zeros(tm.nbytes(T), dtype=torch.uint8, device="cuda")
    prog.run(src, dst, tm.dyn("prefill", Request(T, {0: list(range(11, -1, -1))}), T), 0)
    torch.cuda.synchronize()
    assert prog.kernel == kvcopy.KV_KERNEL and kvcopy.FALLBACKS == []
