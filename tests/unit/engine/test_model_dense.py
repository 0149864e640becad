"""Dense GQA (Llama): the engine's greedy output equals transformers' on a tiny random
checkpoint, for block sizes 1 and 16, layouts HND and NHD, one-shot and chunked prefill."""

from __future__ import annotations

import pytest
import torch

from pd_runtime import kvcache
from pd_runtime.engine.checkpoint import load_checkpoint
from pd_runtime.engine.generate import generate
from pd_runtime.engine.kv import KVCache
from pd_runtime.engine.runner import ModelRunner, RunnerError, SeqChunk
from tests.engine_fixtures import hf_greedy, write_tiny_llama

pytestmark = pytest.mark.timeout(120)

PROMPT = [1, 17, 42, 99, 3, 250, 8, 64, 5, 130, 77]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_tiny_llama(tmp_path_factory.mktemp("llama"), kv_heads=4, layers=3)


@pytest.fixture(scope="module")
def hf_tokens(llama: str) -> list[int]:
    return hf_greedy(llama, PROMPT, 20)


@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_generate_equals_transformers(
    llama: str, hf_tokens: list[int], block_size: int, layout: str
) -> None:
    ck = load_checkpoint(llama)
    assert generate(ck, PROMPT, 20, block_size=block_size, layout=layout) == hf_tokens


@pytest.mark.parametrize("chunk", [1, 4, 5])
def test_chunked_prefill_gives_identical_tokens(
    llama: str, hf_tokens: list[int], chunk: int
) -> None:
    ck = load_checkpoint(llama)
    assert generate(ck, PROMPT, 20, block_size=4, layout="NHD", prefill_chunk=chunk) == hf_tokens


def test_batch_of_mixed_chunks_equals_single_sequences(llama: str) -> None:
    """Two sequences in one step (a prefill chunk beside a decode token) give the logits each
    gives alone: the padded gathers and masks do not leak between sequences."""
    ck = load_checkpoint(llama)
    spec = kvcache.RankSpec(ck.config.model_spec(), block_size=4, num_blocks=16)
    runner = ModelRunner(ck, KVCache.allocate(spec), "cpu")
    a, b = PROMPT[:7], PROMPT[3:]
    ta, tb = {0: [0, 1, 2]}, {0: [5, 6, 7]}
    runner.execute([SeqChunk(a[:6], 0, ta)])
    both = runner.execute([SeqChunk(a[6:], 6, ta), SeqChunk(b, 0, tb)])
    alone = ModelRunner(ck, KVCache.allocate(spec), "cpu")
    ref_b = alone.execute([SeqChunk(b, 0, tb)])
    ref_a = alone.execute([SeqChunk(a, 0, {0: [8, 9]})])
    torch.testing.assert_close(both[1], ref_b[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(both[0], ref_a[0], rtol=1e-4, atol=1e-4)


def test_cache_bytes_live_in_the_arena(llama: str) -> None:
    """The runner writes K/V into the transfer engine's arena at kvcache's row offsets."""
    ck = load_checkpoint(llama)
    spec = kvcache.RankSpec(ck.config.model_spec(), block_size=4, layout="HND", num_blocks=8)
    kv = KVCache.allocate(spec)
    ModelRunner(ck, kv, "cpu").execute([SeqChunk(PROMPT[:5], 0, {0: [3, 6]})])
    pl = kvcache.arena_layout(spec).placements[0]
    row = pl.comp.row_bytes
    for blk, pos in ((3, 0), (3, 3), (6, 0)):
        off = pl.row_offset(blk, 0, pos)
        assert kv.arena[off : off + row].any()
    off = pl.row_offset(6, 0, 1)  # token 5 does not exist
    assert not kv.arena[off : off + row].any()


def test_runner_refuses_bad_batches(llama: str) -> None:
    ck = load_checkpoint(llama)
    spec = kvcache.RankSpec(ck.config.model_spec(), block_size=4, num_blocks=4)
    runner = ModelRunner(ck, KVCache.allocate(spec), "cpu")
    with pytest.raises(RunnerError, match="covers"):
        runner.execute([SeqChunk(PROMPT[:6], 0, {0: [0]})])
    with pytest.raises(RunnerError, match="vocabulary"):
        runner.execute([SeqChunk([9999], 0, {0: [0]})])
    with pytest.raises(RunnerError, match="block id"):
        runner.execute([SeqChunk([1], 0, {0: [7]})])
    with pytest.raises(RunnerError, match="empty"):
        runner.execute([])


@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_decode_reads_the_arena(llama: str, layout: str) -> None:
    """Decode attends to what the arena holds: one changed byte of a cached K row (as a bad
    transfer would leave it) changes the next logits; restoring it restores them."""
    ck = load_checkpoint(llama)
    spec = kvcache.RankSpec(ck.config.model_spec(), block_size=4, layout=layout, num_blocks=8)
    kv = KVCache.allocate(spec)
    runner = ModelRunner(ck, kv, "cpu")
    table = {0: [2, 5, 7, 1]}
    runner.execute([SeqChunk(PROMPT[:9], 0, table)])
    snapshot = kv.arena.clone()
    step = SeqChunk([PROMPT[9]], 9, table)
    ref = runner.execute([step])
    pl = kvcache.arena_layout(spec).placements[1]  # layer 1's KV
    off = pl.row_offset(5, 1, 2) + 3  # block 5, local head 1, token 6: a K byte
    kv.arena.copy_(snapshot)
    kv.arena[off] ^= 0x40
    assert not torch.allclose(runner.execute([step]), ref, atol=1e-6)
    kv.arena.copy_(snapshot)
    torch.testing.assert_close(runner.execute([step]), ref)
