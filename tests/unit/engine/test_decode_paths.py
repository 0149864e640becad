"""The decode-path plumbing that runs on any machine: which path a runner takes (CPU: always the
legacy one), the cached-key bucket of build_meta, and build_split_meta's split of a step into
paged decode tokens and SDPA chunks (writes, tables, key counts) against build_meta's."""

from __future__ import annotations

import pytest
import torch

from pd_runtime import kvcache
from pd_runtime.engine.checkpoint import load_checkpoint
from pd_runtime.engine.kv import KVCache, KVCacheError
from pd_runtime.engine.runner import (
    ModelRunner,
    RunnerError,
    SeqChunk,
    build_meta,
    build_split_meta,
    decode_mode_for,
    graphable,
    key_bucket_for,
)
from tests.engine_fixtures import write_tiny_llama

pytestmark = pytest.mark.timeout(60)

FULL = kvcache.GROUP_FULL


def _kv(block_size: int = 4, num_blocks: int = 32) -> tuple[object, KVCache]:
    from pd_runtime.engine.core import rank_spec_for

    ck = load_checkpoint(write_tiny_llama(_kv.tmp, kv_heads=2, layers=1))  # type: ignore[attr-defined]
    spec = rank_spec_for(ck.config, block_size=block_size, num_blocks=num_blocks)
    return ck, KVCache.allocate(spec)


@pytest.fixture(autouse=True)
def _tmp(tmp_path):
    _kv.tmp = tmp_path  # type: ignore[attr-defined]


def test_cpu_runner_takes_the_legacy_path(monkeypatch: pytest.MonkeyPatch) -> None:
    ck, kv = _kv()
    monkeypatch.setenv("PD_RUNTIME_DECODE", "graph")
    r = ModelRunner(ck, kv, "cpu")  # type: ignore[arg-type]
    assert (r.decode_mode, r.key_bucket, r.graphs) == ("legacy", 0, None)
    assert decode_mode_for("cpu", kv, "dense") == "legacy"
    assert key_bucket_for("cpu") == 0


def test_bad_decode_env_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    _, kv = _kv()
    monkeypatch.setenv("PD_RUNTIME_DECODE", "fast")
    with pytest.raises(RunnerError, match="PD_RUNTIME_DECODE"):
        decode_mode_for("cpu", kv, "dense")


def test_graphable_only_one_rank_without_moe() -> None:
    ck, _ = _kv()
    cfg = ck.config  # type: ignore[attr-defined]
    assert graphable(cfg, 1) and not graphable(cfg, 2)


def test_key_bucket_pads_cached_keys_masked() -> None:
    batch = [SeqChunk([5], 9, {FULL: [3, 1, 2]}), SeqChunk([6, 7], 3, {FULL: [4, 0]})]
    exact = build_meta(batch, FULL, 0, 4, 8, "cpu")
    padded = build_meta(batch, FULL, 0, 4, 8, "cpu", key_bucket=8)
    assert exact.cache_blk.shape == (2, 9) and padded.cache_blk.shape == (2, 16)
    assert torch.equal(padded.cache_blk[:, :9], exact.cache_blk)
    assert exact.mask is not None and padded.mask is not None
    assert torch.equal(padded.mask[..., :9], exact.mask[..., :9])
    # real query rows never attend the pads (padded query rows are discarded anyway)
    assert not padded.mask[0, :, :1, 9:16].any() and not padded.mask[1, :, :2, 9:16].any()
    assert torch.equal(padded.mask[..., 16:], exact.mask[..., 9:])
    one = build_meta([SeqChunk([1, 2, 3], 0, {FULL: [0]})], FULL, 0, 4, 8, "cpu", key_bucket=8)
    assert one.cache_blk.shape == (1, 0) and one.mask is None  # nothing cached: unchanged


def _writes(m: object) -> list[tuple[int, int, int]]:
    cols = (m.write_sel.tolist(), m.write_blk.tolist(), m.write_off.tolist())  # type: ignore[attr-defined]
    return sorted(zip(*cols, strict=True))


def test_split_meta_against_build_meta() -> None:
    batch = [
        SeqChunk([5], 9, {FULL: [3, 1, 2]}),
        SeqChunk([6, 7, 8], 3, {FULL: [4, 0]}),
        SeqChunk([9], 0, {FULL: [7]}),
    ]
    full = build_meta(batch, FULL, 0, 4, 8, "cpu")
    m = build_split_meta(batch, [0, 2], FULL, 0, 4, 8, "cpu", kv_heads=2)
    assert m is not None and m.paged is not None and m.sdpa_rows is not None
    # every token is written, to the same slot as the legacy path writes it
    assert _writes(m) == _writes(full)
    assert m.paged.rows is not None and m.paged.rows.tolist() == [0, 4]
    assert m.sdpa_rows.tolist() == [1, 2, 3]
    assert m.paged.seq_lens.tolist() == [10, 1]
    assert m.paged.table.tolist() == [[3, 1, 2], [7, 0, 0]]
    sub = build_meta([batch[1]], FULL, 0, 4, 8, "cpu")
    assert torch.equal(m.q_index, sub.q_index) and torch.equal(m.cache_blk, sub.cache_blk)
    assert m.paged.num_splits * m.paged.tokens_per_split >= 10
    alone = build_split_meta(batch[:1], [0], FULL, 0, 4, 8, "cpu", kv_heads=2)
    assert alone is not None and alone.paged is not None
    assert alone.paged.rows is None and alone.sdpa_rows is None


def test_split_meta_sliding_null_blocks() -> None:
    sl = kvcache.GROUP_SLIDING
    ok = build_split_meta([SeqChunk([1], 9, {sl: [-1, 5, 6]})], [0], sl, 4, 4, 8, "cpu", 2)
    assert ok is not None and ok.paged is not None
    assert ok.paged.window == 4 and ok.paged.table.tolist() == [[0, 5, 6]]
    with pytest.raises(KVCacheError, match="null block"):
        build_split_meta([SeqChunk([1], 9, {sl: [-1, -1, 6]})], [0], sl, 4, 4, 8, "cpu", 2)
    # the token's own block is null: the legacy path keeps its keys out of the cache
    assert build_split_meta([SeqChunk([1], 9, {sl: [1, 2, -1]})], [0], sl, 0, 4, 8, "cpu", 2) is None
