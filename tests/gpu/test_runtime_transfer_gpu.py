"""GPU: the Triton segment-copy kernels against the torch path, and a CUDA transfer-test cell
(two processes, NIXL VRAM->VRAM, byte-exact). Skips cleanly without CUDA."""

from __future__ import annotations

import numpy as np
import pytest

from tests.gpu_marks import gpu_marks, torch

pytestmark = gpu_marks()


@pytest.mark.parametrize("geo", [
    (1, 1, 16, 16, "HND", "HND"), (1, 2, 16, 32, "HND", "NHD"), (2, 1, 16, 12, "NHD", "HND"),
    (4, 2, 8, 8, "NHD", "NHD"),
])
@pytest.mark.parametrize("cache", ["auto", "fp8"])
def test_triton_gather_scatter_byte_exact(geo, cache):
    from pd_runtime.kernels import SegmentProgram, triton_available
    from pd_runtime.kvcache import ModelSpec, RankSpec, arena_layout
    from pd_runtime.planner import Request, plan_d_rank
    from pd_runtime.reference import expected_decode_arena, random_arena, random_logical, store

    assert triton_available("cuda")
    p_tp, d_tp, pb, db, pl, dl = geo
    m = ModelSpec(num_layers=3, num_kv_heads=8, head_size=64, cache_dtype=cache)
    T = 333
    p = RankSpec(m, p_tp, 0, pb, pl, (T + pb - 1) // pb + 3)
    d = RankSpec(m, d_tp, 0, db, dl, (T + db - 1) // db + 3)
    rng = np.random.default_rng(1)
    preq = Request(T, {0: [int(x) for x in rng.permutation(p.num_blocks)]})
    dreq = Request(T, {0: [int(x) for x in rng.permutation(d.num_blocks)]})
    lg = random_logical(p, T, 2)
    arenas = []
    for r in range(p_tp):
        a = random_arena(p.with_rank(r), 10 + r)
        store(p.with_rank(r), a, preq, lg)
        arenas.append(torch.from_numpy(a).cuda())
    for dr in range(d_tp):
        dd = d.with_rank(dr)
        init = random_arena(dd, 20 + dr)
        want = expected_decode_arena(dd, init, dreq, lg)
        got = torch.from_numpy(init).cuda()
        plan = plan_d_rank(p, dd, preq, dreq)
        for pr, pp in plan.peers.items():
            slot = torch.full((pp.nbytes + 256,), 0x5A, dtype=torch.uint8, device="cuda")
            SegmentProgram.prepare(pp.gather, "cuda").run(arenas[pr], slot)
            SegmentProgram.prepare(pp.scatter, "cuda").run(slot, got)
        torch.cuda.synchronize()
        assert np.array_equal(got.cpu().numpy(), want)
    del arena_layout


def test_transfer_test_cell_on_cuda():
    try:
        from pd_runtime.transport import import_nixl

        import_nixl()
    except ImportError as e:
        pytest.skip(f"nixl cannot be imported: {e}")
    from pd_runtime.selftest import Cell, run_cells

    cells = [Cell(family="dense", num_kv_heads=8, head_size=64, layers=4, p_tp=1, d_tp=2, p_block=16,
                  d_block=32, p_layout="HND", d_layout="NHD", dtype="bfloat16", tokens=1000, seed=3),
             Cell(family="mla", head_size=64, layers=4, p_tp=2, d_tp=1, p_block=64, d_block=16,
                  dtype="fp8", tokens=700, seed=4)]
    res = run_cells(cells, "cuda")
    for r in res:
        assert r["ok"], r


@pytest.mark.parametrize("family", ["dense", "mla", "sliding", "hybrid-ssm"])
@pytest.mark.parametrize("geo", [
    (1, 1, 16, 16, "HND", "HND"), (1, 2, 16, 32, "HND", "NHD"), (2, 1, 16, 12, "NHD", "HND"),
    (2, 2, 8, 8, "NHD", "NHD"),
])
@pytest.mark.parametrize("cache", ["auto", "fp8"])
def test_template_kernels_byte_exact(family, geo, cache):
    """The Triton template kernels (addresses computed on the device from the block tables) give
    the planner's bytes: slot after the gather, decode arena after the scatter."""
    from pd_runtime.kernels.kvcopy import program_for
    from pd_runtime.kvcache import ModelSpec, RankSpec
    from tests.helpers import kv_pairs, kv_requests

    p_tp, d_tp, pb, db, pl, dl = geo
    m = ModelSpec(family=family, num_layers=3, num_kv_heads=4, head_size=64, cache_dtype=cache,
                  sliding_window=37 if family == "sliding" else 0, kv_lora_rank=512, rope_dim=64)
    T = 333
    p = RankSpec(m, p_tp, 0, pb, pl, (T + pb - 1) // pb + 3)
    d = RankSpec(m, d_tp, 0, db, dl, (T + db - 1) // db + 3)
    preq, dreq = kv_requests(p, d, T, np.random.default_rng(7))
    for c in kv_pairs(p, d, preq, dreq):
        tm = c.template
        assert tm.nbytes(T) == c.nbytes
        slot = torch.full(c.want_slot.shape, 0x5A, dtype=torch.uint8, device="cuda")
        g = program_for(tm.gather, "cuda", True)
        assert g.use_triton
        g.run(torch.from_numpy(c.p_arena).cuda(), slot, tm.dyn("prefill", preq, T), 256)
        torch.cuda.synchronize()
        assert np.array_equal(slot.cpu().numpy(), c.want_slot)
        got = torch.from_numpy(c.d_arena).cuda()
        program_for(tm.scatter, "cuda", False).run(slot, got, tm.dyn("decode", dreq, T), 256)
        torch.cuda.synchronize()
        assert np.array_equal(got.cpu().numpy(), c.want)


@pytest.mark.parametrize("geo", [(1, 2, 16, 32, "HND", "NHD"), (2, 1, 16, 12, "NHD", "HND")])
def test_direct_launches_give_the_jits_bytes(geo, monkeypatch):
    """After its first launch (through Triton's JIT) a template kernel is launched directly from
    the compiled kernel kept under its specialization; block tables at an address that is not
    16-byte aligned get a compiled kernel of their own. Every launch, either way, writes the
    planner's bytes, and PD_RUNTIME_KV_LAUNCH=jit keeps every launch on the JIT."""
    from pd_runtime.kernels.kvcopy import KVProgram, upload_all
    from pd_runtime.kvcache import ModelSpec, RankSpec
    from pd_runtime.template import Dyn
    from tests.helpers import kv_pairs, kv_requests

    p_tp, d_tp, pb, db, pl, dl = geo
    m = ModelSpec(num_layers=3, num_kv_heads=4, head_size=64, cache_dtype="fp8")
    T = 333
    p = RankSpec(m, p_tp, 0, pb, pl, (T + pb - 1) // pb + 3)
    d = RankSpec(m, d_tp, 0, db, dl, (T + db - 1) // db + 3)
    preq, dreq = kv_requests(p, d, T, np.random.default_rng(5))
    filler = Dyn(0, 0, 0, 0, 0, np.zeros(1, np.int64))  # 9 int64s: the next table is 8 B off 16
    dev = torch.device("cuda")
    for mode in ("direct", "jit"):
        monkeypatch.setenv("PD_RUNTIME_KV_LAUNCH", mode)
        for c in kv_pairs(p, d, preq, dreq):
            tm = c.template
            g, s = KVProgram(tm.gather, "cuda", True), KVProgram(tm.scatter, "cuda", False)
            assert g.direct == s.direct == (mode == "direct")
            pdyn, ddyn = tm.dyn("prefill", preq, T), tm.dyn("decode", dreq, T)
            p_arena = torch.from_numpy(c.p_arena).cuda()
            for i in range(6):
                items = [(pdyn, 256), (ddyn, 256)]
                # the filler moves both tables by 72 bytes: each lands aligned in one parity
                bts = upload_all(dev, [(filler, 0)] + items if i % 2 else items)[-2:]
                slot = torch.full(c.want_slot.shape, 0x5A, dtype=torch.uint8, device="cuda")
                g.run(p_arena, slot, pdyn, 256, bts[0])
                got = torch.from_numpy(c.d_arena).cuda()
                s.run(slot, got, ddyn, 256, bts[1])
                torch.cuda.synchronize()
                assert np.array_equal(slot.cpu().numpy(), c.want_slot), (mode, i, "gather")
                assert np.array_equal(got.cpu().numpy(), c.want), (mode, i, "scatter")
            for prog in (g, s):
                for k in prog.classes:
                    if mode == "jit":
                        assert not k.compiled
                        continue
                    assert {key[4] for key in k.compiled} == {True, False}  # bt aligned or not
                    assert all(x.form in ("all", "plain") for x in k.compiled.values())
