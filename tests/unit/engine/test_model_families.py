"""Every family against transformers on tiny random checkpoints (MoE: Mixtral and Qwen2-MoE;
sliding: Qwen2 with alternating windowed layers as kvcache.py lays them out, and Mistral with
every layer windowed; MLA: DeepSeek-V2 with and without q_lora; hybrid-ssm: Bamba, attention on
even layers and Mamba-2 on odd ones), across block sizes, layouts and chunked prefill; the
sliding group's null blocks; SSM state slots; fp8 KV caches with per-token-head scales."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pd_runtime import kvcache
from pd_runtime.engine.checkpoint import Checkpoint, load_checkpoint
from pd_runtime.engine.generate import generate
from pd_runtime.engine.kv import KVCache, KVCacheError, chunk_block_table
from pd_runtime.engine.runner import ModelRunner, SeqChunk
from tests.engine_fixtures import FAMILY_CONFIGS, hf_greedy, write_family

pytestmark = pytest.mark.timeout(300)

PROMPT = [1, 17, 42, 99, 3, 250, 8, 64, 5, 130, 77, 12, 9]
N = 12


def hf_greedy_uncached(path: str, prompt: list[int], n: int) -> list[int]:
    """Greedy by full forward passes (no cache): transformers 5.x Bamba's cached generate drifts
    from its own forward pass on prompts of ~145+ tokens; the uncached forward is the reference."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, list[int]]]:
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("families")
    out = {}
    for fam in FAMILY_CONFIGS:
        path = write_family(root / fam, fam)
        out[fam] = (path, hf_greedy(path, PROMPT, N))
    return out


EXPECTED_FAMILY = {
    "dense": "dense",
    "dense-qk-norm": "dense",
    "dense-llama3-rope": "dense",
    "moe": "moe",
    "moe-shared": "moe",
    "sliding": "sliding",
    "sliding-all": "dense",
    "mla": "mla",
    "mla-qlora": "mla",
    "hybrid": "hybrid-ssm",
    "hybrid-1group": "hybrid-ssm",
}


@pytest.mark.parametrize("fam", list(FAMILY_CONFIGS))
def test_family_equals_transformers(ckpts: dict, fam: str) -> None:
    path, ref = ckpts[fam]
    ck = load_checkpoint(path)
    assert ck.config.family == EXPECTED_FAMILY[fam]
    assert generate(ck, PROMPT, N, block_size=16, layout="HND") == ref
    assert generate(ck, PROMPT, N, block_size=1, layout="NHD") == ref
    assert generate(ck, PROMPT, N, block_size=3, layout="HND", prefill_chunk=4) == ref


def test_window_is_applied(ckpts: dict) -> None:
    """Without its window the Mistral-style model gives other tokens (the test above can fail)."""
    path, ref = ckpts["sliding-all"]
    ck = load_checkpoint(path)
    full = Checkpoint(dataclasses.replace(ck.config, sliding_layers=()), ck.weights, None, path)
    assert generate(full, PROMPT, N) != ref


def zero_null_blocks(kv: KVCache, m: kvcache.ModelSpec, n: int, ids: list[int]) -> int:
    """Zero every block kvcache.make_block_table marks null for n tokens (the transfer engine
    does not move them); the number of blocks zeroed."""
    zeroed = 0
    for g in kvcache.groups_of(m):
        table = kvcache.make_block_table(m, g, n, kv.block_size, ids)
        dead = [ids[i] for i, b in enumerate(table) if b == -1]
        for lc in kv.layers.values():
            if lc.group == g and dead:
                lc.data[torch.tensor(dead)] = 0
                zeroed += len(dead)
    return zeroed


@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_decode_from_live_blocks_only(ckpts: dict, layout: str) -> None:
    """P prefills; only the blocks make_block_table keeps live survive (as after a transfer);
    D recomputes the last prompt token from P's tables and decodes: the tokens of generate."""
    path, ref = ckpts["sliding"]
    ck = load_checkpoint(path)
    m = ck.config.model_spec()
    bs, n = 2, len(PROMPT)
    spec = kvcache.RankSpec(m, block_size=bs, layout=layout, num_blocks=32)
    kv = KVCache.allocate(spec)
    runner = ModelRunner(ck, kv, "cpu")
    ids = list(range(spec.num_blocks))
    full = {g: chunk_block_table(m, g, 0, n, bs, ids) for g in (0, 1)}
    runner.execute([SeqChunk(PROMPT, 0, full)])
    assert zero_null_blocks(kv, m, n, ids) > 0
    p_tables = {g: kvcache.make_block_table(m, g, n, bs, ids) for g in (0, 1)}
    assert -1 in p_tables[kvcache.GROUP_SLIDING]
    out = [int(runner.execute([SeqChunk(PROMPT[-1:], n - 1, p_tables)])[0].argmax())]
    while len(out) < N:
        start = n + len(out) - 1
        tables = {g: chunk_block_table(m, g, start, start + 1, bs, ids) for g in (0, 1)}
        out.append(int(runner.execute([SeqChunk(out[-1:], start, tables)])[0].argmax()))
    assert out == ref
    late = {g: kvcache.make_block_table(m, g, n + 3 * bs, bs, ids) for g in (0, 1)}
    with pytest.raises(KVCacheError, match="null block"):
        runner.execute([SeqChunk(PROMPT[-1:], n - 1, late)])


@pytest.mark.parametrize("fam", ["dense", "mla", "sliding"])
@pytest.mark.parametrize("cache_dtype", ["fp8", "fp8_e5m2"])
def test_fp8_cache(ckpts: dict, fam: str, cache_dtype: str) -> None:
    """fp8 KV with per-token-head scales: chunked prefill gives the one-shot tokens exactly,
    the first logits stay close to the unquantized ones, and the scales sit in the arena."""
    path, _ = ckpts[fam]
    ck = load_checkpoint(path)
    one = generate(ck, PROMPT, 6, block_size=4, cache_dtype=cache_dtype)
    assert (
        generate(
            ck, PROMPT, 6, block_size=3, layout="NHD", prefill_chunk=5, cache_dtype=cache_dtype
        )
        == one
    )
    m8 = ck.config.model_spec(cache_dtype)
    spec8 = kvcache.RankSpec(m8, block_size=4, num_blocks=8)
    kv8 = KVCache.allocate(spec8)
    tables = {g: list(range(4)) for g in (0, 1)}
    l8 = ModelRunner(ck, kv8, "cpu").execute([SeqChunk(PROMPT, 0, tables)])
    ref_spec = kvcache.RankSpec(ck.config.model_spec(), block_size=4, num_blocks=8)
    lref = ModelRunner(ck, KVCache.allocate(ref_spec), "cpu").execute([SeqChunk(PROMPT, 0, tables)])
    tol = 0.15 if cache_dtype == "fp8" else 0.4
    assert (l8 - lref).abs().max() < tol * lref.abs().max()
    scales = [p for p in kvcache.arena_layout(spec8).placements if p.comp.name.endswith("_scale")]
    assert len(scales) == ck.config.num_layers
    for p in scales:
        s = kv8.arena[p.offset : p.offset + p.nbytes].view(torch.float32)
        assert (s > 0).sum() > 0
        assert int((s > 0).sum()) == len(PROMPT) * len(p.heads) * p.comp.row_bytes // 4


def test_fp8_scale_values() -> None:
    """quantize stores amax / fp8-max per (token, head, K|V); dequantize inverts within fp8."""
    from pd_runtime.engine.kv import dequantize, quantize

    x = torch.randn(5, 3, 16) * torch.arange(1, 6).float()[:, None, None]
    q, s = quantize(x, 2, torch.float8_e4m3fn)
    assert s.shape == (5, 3, 2)
    torch.testing.assert_close(s[..., 0], x[..., :8].abs().amax(-1) / 448.0)
    torch.testing.assert_close(dequantize(q, s, 2, torch.float32), x, rtol=0.07, atol=1e-3)


@pytest.mark.parametrize("fam", ["hybrid", "hybrid-1group"])
def test_hybrid_long_prompt_equals_transformers(ckpts: dict, fam: str) -> None:
    """A prompt longer than the SSD sub-chunk (64) and HF's scan chunk: the state carries."""
    path, _ = ckpts[fam]
    prompt = [(i * 37 + 11) % 256 for i in range(150)]
    ref = hf_greedy_uncached(path, prompt, 6)
    ck = load_checkpoint(path)
    assert generate(ck, prompt, 6) == ref
    assert generate(ck, prompt, 6, prefill_chunk=70, block_size=4, layout="NHD") == ref


def test_hybrid_state_hand_over(ckpts: dict) -> None:
    """P prefills [0, n-1) into slot 0 and computes the last token from it into slot 1
    (state_src_slot), so slot 0 holds the state D needs; D (a copy of P's arena, as after a
    pull) recomputes the last prompt token from slot 0 and decodes the tokens of generate."""
    path, ref = ckpts["hybrid"]
    ck = load_checkpoint(path)
    m = ck.config.model_spec()
    spec = kvcache.RankSpec(m, block_size=4, num_blocks=16, num_state_slots=4)
    p_kv = KVCache.allocate(spec)
    p_run = ModelRunner(ck, p_kv, "cpu")
    n, table = len(PROMPT), {0: list(range(16))}
    p_run.execute([SeqChunk(PROMPT[:-1], 0, table, state_slot=0)])
    p_logits = p_run.execute([SeqChunk(PROMPT[-1:], n - 1, table, state_slot=1, state_src_slot=0)])
    d_kv = KVCache(spec, p_kv.arena.clone())
    for st in d_kv.states.values():  # slot 1 is P's own; never moved
        st.ssm[1].zero_()
        st.conv_x[1].zero_()
    d_run = ModelRunner(ck, d_kv, "cpu")
    d_logits = d_run.execute([SeqChunk(PROMPT[-1:], n - 1, table, state_slot=2, state_src_slot=0)])
    torch.testing.assert_close(d_logits, p_logits)
    out = [int(d_logits[0].argmax())]
    while len(out) < N:
        start = n + len(out) - 1
        out.append(int(d_run.execute([SeqChunk(out[-1:], start, table, state_slot=2)])[0].argmax()))
    assert out == ref
    fresh = ModelRunner(ck, KVCache.allocate(spec), "cpu")
    with pytest.raises(Exception, match="state slot"):
        fresh.execute([SeqChunk(PROMPT, 0, table, state_slot=9)])


@pytest.mark.parametrize("fam", ["moe", "sliding", "mla", "hybrid"])
def test_batched_sequences_equal_alone(ckpts: dict, fam: str) -> None:
    """Sequences of different lengths and positions in one step (prefill chunks beside a
    decode token) give the logits each gives alone: padding, masks, windows, slots."""
    ck = load_checkpoint(ckpts[fam][0])
    m = ck.config.model_spec()
    spec = kvcache.RankSpec(m, block_size=2, num_blocks=48, num_state_slots=4)
    seqs = {"a": PROMPT, "b": PROMPT[::-1][:9], "c": [5, 6, 7, 8, 9, 10]}
    base = {"a": 0, "b": 16, "c": 32}
    slot = {"a": 0, "b": 1, "c": 2}

    def chunk(name: str, start: int, end: int) -> SeqChunk:
        ids = list(range(base[name], base[name] + 16))
        tables = {g: chunk_block_table(m, g, start, end, 2, ids) for g in (0, 1)}
        return SeqChunk(seqs[name][start:end], start, tables, state_slot=slot[name])

    steps = [[("a", 0, 7), ("c", 0, 5)], [("a", 7, 13), ("b", 0, 9), ("c", 5, 6)]]
    batched = ModelRunner(ck, KVCache.allocate(spec), "cpu")
    alone = ModelRunner(ck, KVCache.allocate(spec), "cpu")
    for step in steps:
        got = batched.execute([chunk(*s) for s in step])
        for i, s in enumerate(step):
            ref = alone.execute([chunk(*s)])[0]
            torch.testing.assert_close(got[i], ref, rtol=1e-4, atol=1e-4)
