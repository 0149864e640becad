"""Derive the `spec.model` block of a PDDeployment from a Hugging Face `config.json` (pure).

The numbers are the ones vLLM puts into its NIXL compatibility hash:

* `numKVHeads` is the *total* KV head count (`ModelConfig.get_total_num_kv_heads`); for MLA
  models vLLM counts one latent head.
* `headSize` is `head_dim`, else `hidden_size // num_attention_heads`; for MLA it is
  `kv_lora_rank + qk_rope_head_dim` (the latent plus the decoupled RoPE key).
* `numHiddenLayers` is `num_hidden_layers` (`get_total_num_hidden_layers`): for hybrid SSM models
  that counts Mamba and attention layers together.

Multimodal configs keep the language model under `text_config`; that is what is read (with the
top-level values as a fallback). `pdctl model-info CONFIG.json` prints the result.
"""

from __future__ import annotations

from typing import Any

_DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}
DEFAULT_DTYPE = "bfloat16"

# Architecture name fragments of hybrid SSM models -> the Mamba layer type vLLM's NIXL worker
# sees. Checked in order: the more specific fragments first ("Mamba2" before "Mamba").
_HYBRID_ARCHES: tuple[tuple[str, str], ...] = (
    ("NemotronH", "mamba2"),
    ("GraniteMoeHybrid", "mamba2"),
    ("Bamba", "mamba2"),
    ("FalconH1", "mamba2"),
    ("Zamba2", "mamba2"),
    ("Plamo2", "mamba2"),
    ("Mamba2", "mamba2"),
    ("Jamba", "mamba1"),
    ("Mamba", "mamba1"),
    ("Qwen3Next", "gdn"),
    ("KimiLinear", "gdn"),
    ("Lfm2", "short-conv"),
    ("MiniMaxText01", "linear"),
    ("MiniMaxM1", "linear"),
)
# layer_types entries that mark a non-attention (state) layer, and the Mamba type they imply.
_LAYER_TYPE_MAMBA = {
    "mamba": None,  # Mamba1 or Mamba2: decided by the Mamba2-only keys below
    "mamba2": "mamba2",
    "linear_attention": "gdn",
    "conv": "short-conv",
    "short_conv": "short-conv",
}
_MAMBA2_KEYS = ("mamba_d_head", "mamba_n_groups", "mamba_head_dim", "mamba_num_heads", "n_groups")
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def _first(cfg: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        value = cfg.get(key)
        if value is not None:
            return value
    return None


def _require(cfg: dict[str, Any], *keys: str, what: str) -> Any:
    value = _first(cfg, *keys)
    if value is None:
        names = " / ".join(repr(k) for k in keys)
        raise ValueError(f"cannot read {what} from the model config: missing key {names}")
    return value


def _int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"config key {key!r} must be an integer, got {value!r}")
    return value


def _architectures(cfg: dict[str, Any], text: dict[str, Any]) -> list[str]:
    arches = cfg.get("architectures") or text.get("architectures") or []
    return [str(a) for a in arches] if isinstance(arches, list) else [str(arches)]


def _dtype(cfg: dict[str, Any], text: dict[str, Any]) -> str:
    raw = _first(text, "torch_dtype", "dtype")
    if raw is None:
        raw = _first(cfg, "torch_dtype", "dtype")
    if raw is None:
        return DEFAULT_DTYPE
    key = str(raw).removeprefix("torch.").lower()
    if key not in _DTYPES:
        raise ValueError(f"unsupported model dtype {raw!r} (config key 'torch_dtype'); "
                         f"expected one of float32, float16, bfloat16")
    return _DTYPES[key]


def _hybrid_mamba_type(arches: list[str], text: dict[str, Any]) -> str | None | bool:
    """The Mamba type of a hybrid SSM model; False when the model is not a hybrid SSM.

    None means "hybrid, type not recognised" (the caller then guesses from the keys).
    """
    joined = " ".join(arches)
    for fragment, mamba_type in _HYBRID_ARCHES:
        if fragment in joined:
            return mamba_type
    layer_types = text.get("layer_types") or text.get("layers_block_type") or []
    if isinstance(layer_types, list):
        for lt in layer_types:
            if str(lt) in _LAYER_TYPE_MAMBA:
                return _LAYER_TYPE_MAMBA[str(lt)]
    pattern = text.get("hybrid_override_pattern")
    if isinstance(pattern, str) and "M" in pattern:
        return "mamba2"
    if any(k in text for k in ("mamba_d_state", "ssm_state_size", "mamba_expand")) and (
        "attn_layer_period" in text or "attn_layer_indices" in text
    ):
        return None
    return False


def _sliding_window(text: dict[str, Any]) -> int:
    window = _first(text, "sliding_window", "attention_window_size")
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        return 0
    layer_types = text.get("layer_types")
    if isinstance(layer_types, list) and layer_types:
        # Newer configs list every layer; a window applies only where a layer slides.
        return window if "sliding_attention" in layer_types else 0
    if text.get("use_sliding_window") is False:  # Qwen2 family: window declared, not used
        return 0
    return window


def _is_sparse_mla(arches: list[str], text: dict[str, Any]) -> bool:
    return "index_topk" in text or any("DeepseekV32" in a for a in arches)


def model_block_from_hf_config(config: dict, name: str | None = None) -> dict:
    """The `spec.model` block (camelCase keys) for a Hugging Face config.json.

    `name` is the exact string the engine is started with (hub id or mounted path); it defaults
    to the config's `_name_or_path`. Raises ValueError naming the key when the config lacks
    something the block needs.
    """
    if not isinstance(config, dict):
        raise ValueError(
            f"expected the parsed config.json (a mapping), got {type(config).__name__}")
    text_config = config.get("text_config")
    if text_config is not None and not isinstance(text_config, dict):
        raise ValueError("config key 'text_config' must be a mapping")
    # Multimodal wrappers keep the language model's numbers in text_config; older ones keep
    # them at the top level next to vision_config. Text values win; top-level values fill in.
    text = {**config, **text_config} if text_config else dict(config)

    model_name = name or config.get("_name_or_path") or text.get("_name_or_path")
    if not model_name:
        raise ValueError("no model name: pass the string the engine is started with "
                         "(the config has no '_name_or_path')")

    arches = _architectures(config, text)
    is_multimodal = any(
        k in config for k in ("vision_config", "audio_config", "visual", "vision_tower")
    ) or text_config is not None and any("ConditionalGeneration" in a for a in arches)

    block: dict[str, Any] = {"name": str(model_name)}
    dtype = _dtype(config, text)

    if config.get("is_encoder_decoder") or text.get("is_encoder_decoder"):
        # The decoder's self-attention KV is what a P/D split would move (never supported).
        heads = _int(_require(text, "decoder_attention_heads", "num_heads", "num_attention_heads",
                              what="the decoder attention head count"), "num_heads")
        kv_heads = _first(text, "num_key_value_heads")
        d_model = _first(text, "d_model", "hidden_size")
        head = _first(text, "d_kv", "head_dim")
        if head is None:
            if d_model is None:
                raise ValueError("cannot read the head size from the model config: missing key "
                                 "'d_kv' / 'head_dim' / 'd_model'")
            head = _int(d_model, "d_model") // heads
        layers = _require(text, "num_decoder_layers", "decoder_layers", "num_layers",
                          "num_hidden_layers", what="the decoder layer count")
        block.update(family="encoder-decoder", dtype=dtype,
                     numKVHeads=_int(kv_heads if kv_heads is not None else heads, "num_heads"),
                     headSize=_int(head, "d_kv"),
                     numHiddenLayers=_int(layers, "num_decoder_layers"), slidingWindow=0)
        return block

    layers = _int(_require(text, "num_hidden_layers", "n_layer", "num_layers",
                           what="the layer count"), "num_hidden_layers")

    kv_lora_rank = text.get("kv_lora_rank")
    if kv_lora_rank is not None:
        rope = _require(text, "qk_rope_head_dim", what="the MLA rope head size")
        block.update(
            family="sparse-mla" if _is_sparse_mla(arches, text) else "mla",
            dtype=dtype, numKVHeads=1,
            headSize=_int(kv_lora_rank, "kv_lora_rank") + _int(rope, "qk_rope_head_dim"),
            numHiddenLayers=layers, slidingWindow=_sliding_window(text),
        )
        return block

    heads = _int(_require(text, "num_attention_heads", "n_head", "num_heads",
                          what="the attention head count"), "num_attention_heads")
    kv_heads = _first(text, "num_key_value_heads", "num_kv_heads", "n_head_kv",
                      "multi_query_group_num")
    if kv_heads is None and text.get("multi_query"):
        kv_heads = 1
    head_size = text.get("head_dim")
    if head_size is None:
        hidden = _int(_require(text, "hidden_size", "n_embd", "d_model",
                               what="the head size ('head_dim' or 'hidden_size')"), "hidden_size")
        head_size = hidden // heads

    mamba_type = _hybrid_mamba_type(arches, text)
    if mamba_type is not False:
        family = "hybrid-ssm"
        if mamba_type is None:
            mamba_type = "mamba2" if any(k in text for k in _MAMBA2_KEYS) else "mamba1"
    elif is_multimodal:
        family = "multimodal"
    elif any(isinstance(n := text.get(k), int) and n > 0 for k in _MOE_KEYS):
        family = "moe"
    else:
        family = "dense"

    block.update(
        family=family, dtype=dtype,
        numKVHeads=_int(kv_heads if kv_heads is not None else heads, "num_key_value_heads"),
        headSize=_int(head_size, "head_dim"),
        numHiddenLayers=layers, slidingWindow=_sliding_window(text),
    )
    if family == "hybrid-ssm":
        block["mambaType"] = mamba_type
    return block
