"""Random-weight models at real geometries, built on the device directly (nothing on disk).

The same (geometry, seed, device type) gives the same weights in every process (the CUDA and CPU
generators are deterministic), so P, D and the aggregated engine of bench_e2e.py, each in its own
process, serve one model. `hf_model` wraps those very tensors (no copy) in transformers'
LlamaForCausalLM for the baseline.
"""

from __future__ import annotations

import math
from typing import Any

import torch

GEOMETRIES: dict[str, dict[str, Any]] = {
    # Meta-Llama-3-8B's config.json (the facts that shape compute and KV), eos disabled
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                      intermediate_size=14336, rope_theta=500000.0,
                      max_position_embeddings=131072, dtype="bfloat16",
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8192}),
    # DeepSeek-V2-Lite's attention (MLA: kv_lora_rank 512 + rope 64 per token, 16 heads,
    # nope 128, v 128, no q LoRA) on 27 layers, with a dense MLP (its MoE left out: the decode
    # path under test is the attention's), default rope
    "dsv2-lite-mla": dict(vocab_size=102400, hidden_size=2048, num_hidden_layers=27,
                          num_attention_heads=16, num_key_value_heads=16, head_dim=192,
                          intermediate_size=10944, rope_theta=10000.0,
                          max_position_embeddings=163840, dtype="bfloat16", mla=True,
                          kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
                          v_head_dim=128, q_lora_rank=None),
    # the same code paths in seconds on a CPU (float32: the engine and transformers agree closely)
    "tiny": dict(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, intermediate_size=256, rope_theta=10000.0,
                 max_position_embeddings=65536, dtype="float32"),
}


def hf_config(geometry: str) -> dict[str, Any]:
    g = dict(GEOMETRIES[geometry])
    if g.pop("mla", False):
        return {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
                "hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                "attention_bias": False, "bos_token_id": 1, "eos_token_id": None,
                "n_routed_experts": None, "torch_dtype": g["dtype"], **g}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "attention_bias": False,
            "mlp_bias": False, "bos_token_id": 1, "eos_token_id": None,
            "torch_dtype": g["dtype"], **g}


def weight_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    if cfg["model_type"] == "deepseek_v2":
        return _mla_shapes(cfg)
    d, hd, inter = cfg["hidden_size"], cfg["head_dim"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (cfg["vocab_size"], d),
        "model.norm.weight": (d,),
        "lm_head.weight": (cfg["vocab_size"], d),
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
            p + "mlp.gate_proj.weight": (inter, d), p + "mlp.up_proj.weight": (inter, d),
            p + "mlp.down_proj.weight": (d, inter),
        })
    return shapes


def _mla_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    d, inter, h = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"]
    r, rd = cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
    nope, dv = cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (cfg["vocab_size"], d),
        "model.norm.weight": (d,),
        "lm_head.weight": (cfg["vocab_size"], d),
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (h * (nope + rd), d),
            p + "self_attn.kv_a_proj_with_mqa.weight": (r + rd, d),
            p + "self_attn.kv_a_layernorm.weight": (r,),
            p + "self_attn.kv_b_proj.weight": (h * (nope + dv), r),
            p + "self_attn.o_proj.weight": (d, h * dv),
            p + "mlp.gate_proj.weight": (inter, d), p + "mlp.up_proj.weight": (inter, d),
            p + "mlp.down_proj.weight": (d, inter),
        })
    return shapes


def random_weights(cfg: dict[str, Any], device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Hugging Face names -> tensors on `device` in the config's dtype. Scaled like a trained
    model's activations (unit-variance embeddings, 1/sqrt(fan_in) matrices, norms near 1) so the
    residual stream stays finite over 32 layers and logits are not all ties."""
    dtype = getattr(torch, cfg["dtype"])
    g = torch.Generator(device=device).manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in weight_shapes(cfg).items():
        t = torch.randn(shape, generator=g, device=device, dtype=dtype)
        if name.endswith("norm.weight"):
            t.mul_(0.1).add_(1.0)
        elif "embed_tokens" not in name:
            t.mul_(1.0 / math.sqrt(shape[-1]))
        out[name] = t
    return out


def random_checkpoint(geometry: str, device: str, seed: int = 0) -> Any:
    """An engine Checkpoint (no tokenizer) with random weights on `device`."""
    from pd_runtime.engine.checkpoint import Checkpoint
    from pd_runtime.engine.config import ModelConfig

    cfg = hf_config(geometry)
    return Checkpoint(ModelConfig.from_hf(cfg), random_weights(cfg, device, seed), None,
                      f"random:{geometry}:{seed}")


def hf_model(geometry: str, weights: dict[str, torch.Tensor], device: str) -> Any:
    """transformers' LlamaForCausalLM (SDPA attention) over exactly `weights` (assigned, not
    copied): built on the meta device, so no second copy of the model is ever allocated."""
    import transformers
    from transformers.models.llama import modeling_llama

    raw = hf_config(geometry)
    cfg = transformers.LlamaConfig(**{k: v for k, v in raw.items()
                                      if k not in ("architectures", "torch_dtype", "dtype")})
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    model.load_state_dict(weights, strict=True, assign=True)
    # the rotary table is a non-persistent buffer: build it for real on the device
    with torch.device(device):
        model.model.rotary_emb = modeling_llama.LlamaRotaryEmbedding(config=cfg)
    return model.eval()


def param_counts(cfg: dict[str, Any]) -> dict[str, int]:
    """Parameters per kind, for the FLOP count: the layers' matrices, embedding, LM head."""
    shapes = weight_shapes(cfg)
    layers = sum(math.prod(s) for n, s in shapes.items() if ".layers." in n and len(s) == 2)
    return {"layers": layers, "lm_head": math.prod(shapes["lm_head.weight"]),
            "embed": math.prod(shapes["model.embed_tokens.weight"])}


def prefill_flops(cfg: dict[str, Any], tokens: int, logits_tokens: int = 1) -> float:
    """Model FLOPs of one causal prefill of `tokens` tokens (no recomputation counted):
    2 * matrix params * tokens, causal attention 2 * T^2 * (heads * head_dim) per layer
    (QK^T and PV, half the square), the LM head on `logits_tokens` rows."""
    pc = param_counts(cfg)
    attn = 2.0 * tokens * tokens * cfg["num_attention_heads"] * cfg["head_dim"] \
        * cfg["num_hidden_layers"]
    return 2.0 * pc["layers"] * tokens + attn + 2.0 * pc["lm_head"] * logits_tokens
