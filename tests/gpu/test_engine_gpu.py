"""GPU: the builtin engine's serving paths on CUDA. fp8 KV gives the CPU's tokens; continuous
batching (several sequences a step, chunked prefill, padded masks) equals single-sequence
generation; one prefill pass matches transformers (float32: argmax and 1e-4; bf16: close logits,
the two round differently); P/D moves the KV VRAM -> VRAM (NIXL cuda_ipc, Triton kernels) between
two processes with D's output equal to offline generation. Per-family CUDA == CPU checks are in
tests/unit/engine/test_model_gpu.py. Skips without CUDA.
"""

from __future__ import annotations

import multiprocessing as mp
import random

import pytest

from tests.gpu_marks import gpu_marks, torch

pytestmark = gpu_marks(timeout_s=300)

TOKEN = "gpu-test-side-channel-token"
ROUTER_P_PARAMS = {"do_remote_decode": True, "do_remote_prefill": False}


def _prompts(n: int, seed: int, vocab: int = 256, longest: int = 90) -> list[list[int]]:
    r = random.Random(seed)
    return [[r.randrange(2, vocab) for _ in range(r.randrange(2, longest))] for _ in range(n)]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from tests.engine_fixtures import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("llama"), seed=5, kv_heads=4)


def test_fp8_kv_cuda_equal_cpu(llama_dir, monkeypatch):
    """fp8 quantization of the KV cache on CUDA gives the CPU's tokens, through the same torch ops
    on both devices. The fused glue (kernels.fused, CUDA's default) is held off here: its float32
    sums and rsqrt round differently from torch's, and a last-bit difference can flip an fp8
    rounding and then a near-tie token of this random model (H200 run 10). The fused path is
    checked against the torch ops by tests/gpu/test_fused_gpu.py, and with an fp8 cache by the
    interpreter test in tests/unit/engine/test_fused_kernels.py."""
    from pd_runtime.engine.checkpoint import load_checkpoint
    from pd_runtime.engine.generate import generate

    monkeypatch.setenv("PD_RUNTIME_FUSED", "0")

    ck = load_checkpoint(llama_dir)
    for pr in _prompts(3, seed=12):
        want = generate(ck, pr, 8, ignore_eos=True, cache_dtype="fp8")
        assert generate(ck, pr, 8, ignore_eos=True, cache_dtype="fp8", device="cuda") == want


def test_engine_batches_on_cuda_equal_offline(llama_dir):
    """Continuous batching on CUDA (several sequences per step, chunked prefill over a small
    token budget, padded masks) equals single-sequence generation."""
    from pd_runtime.engine.checkpoint import load_checkpoint
    from pd_runtime.engine.core import engine_from_checkpoint, rank_spec_for
    from pd_runtime.engine.generate import generate
    from pd_runtime.engine.sampling import SamplingParams

    ck = load_checkpoint(llama_dir)
    spec = rank_spec_for(ck.config, block_size=16, layout="HND", num_blocks=96)
    eng = engine_from_checkpoint(ck, spec, device="cuda", seed=0, max_num_batched_tokens=48)
    assert eng.arena is not None and eng.arena.is_cuda
    ps = _prompts(6, seed=13)
    got = eng.generate(ps, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    for i, pr in enumerate(ps):
        assert got[i] == generate(ck, pr, 10, ignore_eos=True, device="cuda"), i
    assert eng.blocks.usage() == 0.0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prefill_matches_transformers_on_cuda(tmp_path, dtype):
    transformers = pytest.importorskip("transformers")
    from pd_runtime import kvcache
    from pd_runtime.engine.checkpoint import load_checkpoint
    from pd_runtime.engine.kv import KVCache
    from pd_runtime.engine.runner import ModelRunner, SeqChunk
    from tests.engine_fixtures import write_tiny_llama

    d = write_tiny_llama(tmp_path / dtype, seed=6, layers=3, hidden=128, heads=8, kv_heads=2,
                         intermediate=256, dtype=dtype)
    ck = load_checkpoint(d)
    ids = _prompts(1, seed=14, longest=400)[0] + list(range(2, 200))
    spec = kvcache.RankSpec(ck.config.model_spec(), block_size=16, layout="HND",
                            num_blocks=kvcache.blocks_needed(len(ids), 16))
    runner = ModelRunner(ck, KVCache.allocate(spec, "cuda"), "cuda")
    table = {kvcache.GROUP_FULL: list(range(spec.num_blocks))}
    ours = runner.execute([SeqChunk(ids, 0, table)])[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=getattr(torch, dtype),
                                                           attn_implementation="sdpa").cuda()
    with torch.inference_mode():
        ref = hf(input_ids=torch.tensor([ids], device="cuda")).logits[0, -1].float()
    rel = float((ours - ref).norm() / ref.norm())
    assert rel < (1e-4 if dtype == "float32" else 3e-2), rel
    if dtype == "float32":
        assert int(ours.argmax()) == int(ref.argmax())


def _prefill_proc(model_dir: str, prompts: list[list[int]], conn) -> None:
    """A prefill engine on CUDA in its own process: prefill as do_remote_decode requests, send
    the kv_transfer_params, then keep stepping (frees what D released) until told to stop."""
    from pd_runtime.engine.checkpoint import load_checkpoint
    from pd_runtime.engine.core import engine_from_checkpoint, rank_spec_for
    from pd_runtime.engine.pd import engine_factors, make_prefill_side
    from pd_runtime.engine.sampling import SamplingParams

    ck = load_checkpoint(model_dir)
    spec = rank_spec_for(ck.config, block_size=16, layout="HND", num_blocks=64)
    eng = engine_from_checkpoint(ck, spec, device="cuda", seed=0)
    assert eng.arena is not None
    eng.prefill = make_prefill_side(spec, engine_factors(ck.config, "tiny"), TOKEN, eng.arena,
                                    device="cuda")
    for i, p in enumerate(prompts):
        eng.add_request(f"q{i}", p, SamplingParams(max_tokens=1, min_tokens=1, temperature=0),
                        dict(ROUTER_P_PARAMS))
    kv = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                kv[o.request_id] = o.kv_transfer_params
    conn.send(kv)
    while not conn.poll(0.01):
        eng.step()
    conn.recv()
    conn.send({"held": len(eng.held), "usage": eng.blocks.usage()})
    eng.prefill.close()


def _decode_engine(ck, device: str = "cuda"):
    from pd_runtime.engine.core import engine_from_checkpoint, rank_spec_for
    from pd_runtime.engine.pd import DecodeSide, engine_factors

    spec = rank_spec_for(ck.config, block_size=32, layout="NHD", num_blocks=32)
    d = engine_from_checkpoint(ck, spec, device=device, seed=0)
    assert d.arena is not None
    d.decode = DecodeSide(spec, engine_factors(ck.config, "tiny"), TOKEN, d.arena, device, 20.0)
    return d


def _decode_all(d, ps, kv, n) -> dict[str, list[int]]:
    from pd_runtime.engine.sampling import SamplingParams

    for i, pr in enumerate(ps):
        d.add_request(f"q{i}", pr, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True),
                      kv[f"q{i}"])
    got: dict[str, list[int]] = {}
    for _ in range(1000):
        if not d.has_unfinished():
            break
        for o in d.step():
            assert o.error is None, o.error
            got.setdefault(o.request_id, []).extend(o.token_ids)
    return got


def test_pd_two_processes_on_cuda_equal_offline(llama_dir):
    """P (block 16, HND) in its own process, D (block 32, NHD) here, one card: the KV moves
    VRAM -> VRAM over NIXL (cuda_ipc) through the Triton gather/scatter kernels."""
    from pd_runtime.transport import import_nixl

    try:
        import_nixl()
    except ImportError as e:
        pytest.skip(f"nixl cannot be imported: {e}")
    from pd_runtime.engine.checkpoint import load_checkpoint
    from pd_runtime.engine.generate import generate
    from pd_runtime.transport import default_env

    default_env("cuda")
    ck = load_checkpoint(llama_dir)
    ps = _prompts(4, seed=15) + [[9]]
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=_prefill_proc, args=(llama_dir, ps, there), daemon=True)
    proc.start()
    d = None
    try:
        assert here.poll(180), "the prefill process did not answer"
        kv = here.recv()
        d = _decode_engine(ck)
        got = _decode_all(d, ps, kv, 8)
        for i, pr in enumerate(ps):
            assert got[f"q{i}"] == generate(ck, pr, 8, ignore_eos=True, device="cuda"), i
        assert d.decode.stats.kv_pulls == 4 and d.blocks.usage() == 0.0
        here.send("stop")
        assert here.poll(60)
        assert here.recv() == {"held": 0, "usage": 0.0}
    finally:
        if d is not None:
            d.decode.close()
        proc.join(30)
        if proc.is_alive():
            proc.kill()

