"""Tiny synthetic GGUF files and tokenizer metadata for fast tests (no download, no real model).

`write_tiny_llama_gguf` writes a 2-layer Llama the way llama.cpp's convert_hf_to_gguf does: the
Hugging Face weights, q/k rows permuted for llama.cpp's rope, llama.cpp tensor names, and a
byte-level BPE vocabulary in the metadata. It returns the Hugging Face weights it started from,
so a test can compare what the loader gives back with the original.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pd_runtime.engine.tokenizer import byte_level_alphabet

CONTROL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d", "1 2",
          "Ġ Ġ"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

HIDDEN, HEADS, KV_HEADS, LAYERS, FFN = 64, 4, 2, 2, 96
HEAD_DIM = HIDDEN // HEADS


def vocab_tokens() -> tuple[list[str], list[int]]:
    """Control tokens first (ids 0..2), then the 256 byte tokens, then one token per merge."""
    tokens = list(CONTROL_TOKENS) + [byte_level_alphabet()[b] for b in range(256)]
    tokens += [m.replace(" ", "") for m in MERGES]
    types = [3] * len(CONTROL_TOKENS) + [1] * (len(tokens) - len(CONTROL_TOKENS))
    return tokens, types


def tokenizer_metadata(**overrides: object) -> dict:
    tokens, types = vocab_tokens()
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": list(MERGES),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }
    meta.update(overrides)
    return meta


def llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, written out independently of the loader."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def random_hf_llama(seed: int = 0, vocab: int | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    vocab = vocab or len(vocab_tokens()[0])

    def rand(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32) * 0.1

    weights = {"model.embed_tokens.weight": rand(vocab, HIDDEN),
               "model.norm.weight": 1 + rand(HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        weights |= {
            p + "input_layernorm.weight": 1 + rand(HIDDEN),
            p + "post_attention_layernorm.weight": 1 + rand(HIDDEN),
            p + "self_attn.q_proj.weight": rand(HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": rand(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": rand(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": rand(HIDDEN, HEADS * HEAD_DIM),
            p + "mlp.gate_proj.weight": rand(FFN, HIDDEN),
            p + "mlp.up_proj.weight": rand(FFN, HIDDEN),
            p + "mlp.down_proj.weight": rand(HIDDEN, FFN),
        }
    return weights


GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
}


def gguf_name(hf_name: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight",
           "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    if hf_name in top:
        return top[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{GGUF_NAMES[rest]}"


def write_tiny_llama_gguf(
    path: Path,
    *,
    architecture: str = "llama",
    quant: dict[str, str] | None = None,
    extra_metadata: dict[str, object] | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
    drop: tuple[str, ...] = (),
    tied: bool = True,
    biases: bool = False,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Write a tiny Llama GGUF; `quant` maps HF names to a GGML type name (default F32).

    Returns the original Hugging Face weights (unpermuted, unquantized).
    """
    import gguf

    hf = random_hf_llama(seed)
    if biases:  # Qwen2: q/k/v projections carry a bias
        rng = np.random.default_rng(seed + 2)
        for i in range(LAYERS):
            for proj, rows in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)):
                hf[f"model.layers.{i}.self_attn.{proj}_proj.bias"] = rng.standard_normal(
                    rows * HEAD_DIM).astype(np.float32)
    if not tied:
        hf["lm_head.weight"] = random_hf_llama(seed + 1)["model.embed_tokens.weight"]
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(hf["model.embed_tokens.weight"].shape[0])
    for key, value in tokenizer_metadata().items():
        _add_metadata(writer, key, value)
    for key, value in (extra_metadata or {}).items():
        _add_metadata(writer, key, value)
    for name, weight in hf.items():
        if name in drop:
            continue
        stored = weight
        if architecture == "llama":  # convert_hf_to_gguf permutes q/k for Llama only
            if name.endswith("q_proj.weight"):
                stored = llama_cpp_permute(weight, HEADS)
            elif name.endswith("k_proj.weight"):
                stored = llama_cpp_permute(weight, KV_HEADS)
        _add_tensor(writer, gguf_name(name), stored, (quant or {}).get(name, "F32"))
    for name, weight in (extra_tensors or {}).items():
        writer.add_tensor(name, weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


def _add_tensor(writer: object, name: str, weight: np.ndarray, qtype_name: str) -> None:
    import gguf

    qtype = gguf.GGMLQuantizationType[qtype_name]
    if qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, weight)  # type: ignore[attr-defined]
    elif qtype == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, weight.astype(np.float16))  # type: ignore[attr-defined]
    else:
        data = gguf.quants.quantize(weight, qtype)
        writer.add_tensor(name, data, raw_dtype=qtype)  # type: ignore[attr-defined]


def _add_metadata(writer: object, key: str, value: object) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)  # type: ignore[attr-defined]
    elif isinstance(value, int):
        writer.add_uint32(key, value)  # type: ignore[attr-defined]
    elif isinstance(value, float):
        writer.add_float32(key, value)  # type: ignore[attr-defined]
    elif isinstance(value, str):
        writer.add_string(key, value)  # type: ignore[attr-defined]
    elif isinstance(value, list):
        writer.add_array(key, value)  # type: ignore[attr-defined]  (element type from value[0])
    else:
        raise TypeError(f"no GGUF type for {key}={value!r}")
