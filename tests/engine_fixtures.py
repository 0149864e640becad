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


def llama_config(*, layers: int = 2, hidden: int = 64, heads: int = 8, kv_heads: int = 8,
                 head_dim: int | None = None, intermediate: int = 128, vocab: int = 256,
                 dtype: str = "float32", tie: bool = False, eos_token_id: int | None = None,
                 max_position: int = 2048, rope_theta: float = 10000.0) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": head_dim or hidden // heads, "hidden_act": "silu",
        "max_position_embeddings": max_position, "rms_norm_eps": 1e-5, "rope_theta": rope_theta,
        "tie_word_embeddings": tie, "bos_token_id": 1, "eos_token_id": eos_token_id,
        "attention_bias": False, "mlp_bias": False, "dtype": dtype, "torch_dtype": dtype,
    }


def write_tiny_llama(path: str | Path, *, seed: int = 0, **cfg_kw: Any) -> str:
    """A random Llama checkpoint in `path` (created); returns the directory as a string.
    Defaults: 2 layers, hidden 64, 8 heads, 8 KV heads, vocabulary 256, float32."""
    from safetensors.torch import save_file

    cfg = llama_config(**cfg_kw)
    d, hd = cfg["hidden_size"], cfg["head_dim"]
    h, kvh, inter = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg["vocab_size"], d),
                                          "model.norm.weight": (d,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (cfg["vocab_size"], d)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                   p + "self_attn.q_proj.weight": (h * hd, d), p + "self_attn.k_proj.weight": (kvh * hd, d),
                   p + "self_attn.v_proj.weight": (kvh * hd, d), p + "self_attn.o_proj.weight": (d, h * hd),
                   p + "mlp.gate_proj.weight": (inter, d), p + "mlp.up_proj.weight": (inter, d),
                   p + "mlp.down_proj.weight": (d, inter)}
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
