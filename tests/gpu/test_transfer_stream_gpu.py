"""GPU: P's gather on its own high-priority stream (kernels/kvcopy.transfer_stream) waits for
the kernels that wrote the held request's KV (the event recorded at `hold()`), and no longer for
what the engine queued after them; the same for a gather made at hold() (staged: the decode
geometry is known then) and claimed by PREPARE. D's side of the same stream is covered by the P/D
tests on CUDA (test_engine_gpu.py, test_runtime_transfer_gpu.py's cell). Skips cleanly without
CUDA."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tests.gpu_marks import gpu_marks, torch

pytestmark = gpu_marks(timeout_s=120)

SLEEP_CYCLES = 400_000_000  # about 0.2 s of one SM's clock: far longer than a gather


def _rank_and_pair(monkeypatch, stream: str, staged: bool = False, staging_bytes=None):
    pytest.importorskip("nixl_cu13", reason="PrefillRank registers its memory with NIXL")
    from pd_runtime.compat.hashing import builtin_factors
    from pd_runtime.kvcache import ModelSpec, RankSpec
    from pd_runtime.worker import PrefillRank
    from tests.helpers import kv_pairs, kv_requests

    monkeypatch.setenv("PD_RUNTIME_TRANSFER_STREAM", stream)
    m = ModelSpec(num_layers=4, num_kv_heads=8, head_size=64)
    p = RankSpec(m, 1, 0, 16, "HND", 40)
    d = RankSpec(m, 2, 0, 32, "NHD", 24)
    preq, dreq = kv_requests(p, d, 500, np.random.default_rng(5))
    pair = next(iter(kv_pairs(p, d, preq, dreq)))
    f = builtin_factors(runtime_version="test", model="test", dtype="bfloat16", num_kv_heads=8,
                        head_size=64, num_hidden_layers=4, cache_dtype="auto", family="dense")
    rank = PrefillRank(p, f, b"gather-stream-test", "cuda", lease_s=60, stage_at_hold=staged,
                       staging_bytes=staging_bytes)
    if staged:  # as if D rank 0 had connected: hold() gathers for it
        rank._consumers[d.with_rank(0)] = 1
    return rank, d, preq, pair


def _gather(rank, rid: str, preq, d):
    """PREPARE `rid` as D rank 0 would: (P's reply, seconds the gather took)."""
    from pd_runtime.protocol import PrepareRequest
    from pd_runtime.worker import _Consumer, req_to_wire

    t0 = time.perf_counter()
    rep = rank._gather(PrepareRequest(rid, preq.num_tokens, req_to_wire(preq)),
                       _Consumer("decode-agent", d.with_rank(0)))
    return rep, time.perf_counter() - t0


def _slot(rank, rep) -> np.ndarray:
    """The staging slot's bytes (a copy on the current stream: waits for what is queued there)."""
    off = rep.addr - rank.staging.data_ptr()
    return rank.staging[off : off + rep.nbytes].cpu().numpy()


@pytest.mark.parametrize("staged", [False, True], ids=["at-prepare", "at-hold"])
@pytest.mark.parametrize("stream", ["priority", "engine"])
def test_gather_waits_for_the_held_requests_kv(monkeypatch, stream, staged):
    rank, d, preq, pair = _rank_and_pair(monkeypatch, stream, staged)
    try:
        assert (rank.stream is not None) == (stream == "priority")
        # the arena's bytes arrive behind a long kernel on the engine's (current) stream; P
        # holds the request at once and gathers: the staging slot must hold the new bytes
        src = torch.from_numpy(pair.p_arena).cuda()
        torch.cuda.synchronize()
        torch.cuda._sleep(SLEEP_CYCLES)
        rank.arena.copy_(src)  # queued behind the sleep, as a prefill's KV writes are
        rank.hold("r1", preq)
        rep, _ = _gather(rank, "r1", preq, d)
        assert np.array_equal(_slot(rank, rep), pair.want_slot[256 : 256 + pair.nbytes])
        assert rank.stats()["staged_claims"] == int(staged)
    finally:
        rank.close()


@pytest.mark.parametrize("staged", [False, True], ids=["at-prepare", "at-hold"])
def test_gather_does_not_wait_for_work_queued_after_hold(monkeypatch, staged):
    rank, d, preq, pair = _rank_and_pair(monkeypatch, "priority", staged)
    try:
        rank.arena.copy_(torch.from_numpy(pair.p_arena).cuda())
        rank.hold("r1", preq)  # a first gather builds the program and compiles the kernel
        _gather(rank, "r1", preq, d)
        rank.hold("r2", preq)
        torch.cuda._sleep(SLEEP_CYCLES)  # the engine's next prefill, launched after hold()
        rep, took = _gather(rank, "r2", preq, d)
        pending = not torch.cuda.current_stream().query()
        assert np.array_equal(_slot(rank, rep), pair.want_slot[256 : 256 + pair.nbytes])
        assert pending, "the engine's stream finished before the gather: the sleep was too short"
        assert took < 0.05, f"the gather took {took * 1e3:.1f} ms: it waited for the engine"
        assert rank.stats()["staged_claims"] == 2 * int(staged)
    finally:
        torch.cuda.synchronize()
        rank.close()


def test_table_upload_on_the_own_stream_does_not_wait_for_the_engine(monkeypatch):
    """D's table upload (from the pinned buffer, on its own stream) lands the same int64 words
    as the CPU path and does not wait for work queued on the engine's stream."""
    from pd_runtime.kernels.kvcopy import queued_work, transfer_stream, upload_all
    from pd_runtime.kvcache import ModelSpec, RankSpec
    from pd_runtime.template import PairTemplate
    from tests.helpers import kv_requests

    monkeypatch.delenv("PD_RUNTIME_TRANSFER_STREAM", raising=False)
    m = ModelSpec(num_layers=4, num_kv_heads=8, head_size=64)
    p, d = RankSpec(m, 1, 0, 16, "HND", 40), RankSpec(m, 2, 0, 32, "NHD", 24)
    preq, dreq = kv_requests(p, d, 500, np.random.default_rng(7))
    dyn = PairTemplate(p, d.with_rank(0)).dyn("decode", dreq, preq.num_tokens)
    want = upload_all(torch.device("cpu"), [(dyn, 256), (dyn, 512)])
    own = transfer_stream("cuda")
    with torch.cuda.stream(own):  # warm: the first CUDA copy pays for its setup
        upload_all(torch.device("cuda"), [(dyn, 256)])
    torch.cuda.synchronize()
    torch.cuda._sleep(SLEEP_CYCLES)  # the engine's work, on its stream
    t0 = time.perf_counter()
    with torch.cuda.stream(own):
        got = upload_all(torch.device("cuda"), [(dyn, 256), (dyn, 512)])
        done = queued_work("cuda")
    assert done is not None
    done.synchronize()
    took = time.perf_counter() - t0
    pending = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    assert all(torch.equal(g.cpu(), w) for g, w in zip(got, want, strict=True))
    assert pending, "the engine's stream finished first: the sleep was too short"
    assert took < 0.05, f"the upload took {took * 1e3:.1f} ms: it waited for the engine"


def test_hold_only_queues_the_gathers(monkeypatch):
    """hold() with two decode geometries connected while the prefill's KV writes are still
    queued behind a long kernel: it returns at once (no table upload waits for an earlier copy
    queued behind the prefill), and the slot claimed afterwards holds the new bytes. The
    staging region has room for r0's and r1's slots (staging keeps half of it free): in a
    smaller one r1 was never staged and this test checked nothing (H200 run 20)."""
    rank, d, preq, pair = _rank_and_pair(monkeypatch, "priority", staged=True,
                                         staging_bytes=64 << 20)
    try:
        rank._consumers[d.with_rank(1)] = 1  # D rank 1 reads P rank 0 too
        src = torch.from_numpy(pair.p_arena).cuda()
        rank.arena.copy_(src)
        rank.hold("r0", preq)  # builds the programs and compiles the kernel
        _gather(rank, "r0", preq, d)
        rank.arena.zero_()
        torch.cuda.synchronize()
        torch.cuda._sleep(SLEEP_CYCLES)
        rank.arena.copy_(src)  # the next prefill's KV writes, queued behind the sleep
        t0 = time.perf_counter()
        rank.hold("r1", preq)
        took = time.perf_counter() - t0
        pending = not torch.cuda.current_stream().query()
        rep, _ = _gather(rank, "r1", preq, d)  # waits for the gather, which waits for the KV
        assert np.array_equal(_slot(rank, rep), pair.want_slot[256 : 256 + pair.nbytes])
        assert pending, "the engine's stream finished first: the sleep was too short"
        assert took < 0.05, f"hold() took {took * 1e3:.1f} ms: it waited for the engine"
        assert rank.stats()["staged_claims"] == 2 and rank.stats()["stage_failures"] == 0
    finally:
        torch.cuda.synchronize()
        rank.close()
