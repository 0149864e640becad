"""model_block_from_hf_config: spec.model blocks from config.json files shaped like real ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pd_operator.api.v1alpha1 import ModelSpec
from pd_operator.model_info import model_block_from_hf_config

ROOT = Path(__file__).resolve().parents[2]
HF_CONFIGS = ROOT / "deploy" / "examples" / "hf-configs"

LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rope_theta": 500000.0,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}

MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"],
    "hidden_size": 4096,
    "model_type": "mixtral",
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "sliding_window": None,
    "torch_dtype": "bfloat16",
}

QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "head_dim": 128,
    "hidden_size": 2048,  # 2048 / 32 = 64: head_dim must win
    "model_type": "qwen3_moe",
    "num_attention_heads": 32,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 48,
    "num_key_value_heads": 4,
    "sliding_window": None,
    "use_sliding_window": False,
    "torch_dtype": "bfloat16",
}

DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "hidden_size": 7168,
    "kv_lora_rank": 512,
    "model_type": "deepseek_v3",
    "n_routed_experts": 256,
    "num_attention_heads": 128,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "torch_dtype": "bfloat16",
}

DEEPSEEK_V32 = {
    **DEEPSEEK_V3,
    "architectures": ["DeepseekV32ForCausalLM"],
    "model_type": "deepseek_v32",
    "index_head_dim": 128,
    "index_n_heads": 64,
    "index_topk": 2048,
}

QWEN25_VL_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "hidden_size": 3584,
    "model_type": "qwen2_5_vl",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "sliding_window": 32768,
    "use_sliding_window": False,
    "torch_dtype": "bfloat16",
    "vision_config": {"depth": 32, "hidden_size": 1280, "num_heads": 16, "out_hidden_size": 3584},
}

# Newer multimodal layout: the language model under text_config.
GEMMA3_27B_IT = {
    "architectures": ["Gemma3ForConditionalGeneration"],
    "model_type": "gemma3",
    "text_config": {
        "head_dim": 128,
        "hidden_size": 5376,
        "model_type": "gemma3_text",
        "num_attention_heads": 32,
        "num_hidden_layers": 62,
        "num_key_value_heads": 16,
        "sliding_window": 1024,
        "sliding_window_pattern": 6,
    },
    "torch_dtype": "bfloat16",
    "vision_config": {"hidden_size": 1152, "model_type": "siglip_vision_model"},
}

GEMMA2_9B = {
    "architectures": ["Gemma2ForCausalLM"],
    "cache_implementation": "hybrid",
    "head_dim": 256,
    "hidden_size": 3584,
    "model_type": "gemma2",
    "num_attention_heads": 16,
    "num_hidden_layers": 42,
    "num_key_value_heads": 8,
    "sliding_window": 4096,
    "torch_dtype": "float32",
}

NEMOTRON_H_8B = {
    "architectures": ["NemotronHForCausalLM"],
    "head_dim": 128,
    "hidden_size": 4096,
    "hybrid_override_pattern": "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
    "mamba_head_dim": 64,
    "mamba_num_heads": 128,
    "model_type": "nemotron_h",
    "n_groups": 8,
    "num_attention_heads": 32,
    "num_hidden_layers": 52,
    "num_key_value_heads": 8,
    "ssm_state_size": 128,
    "torch_dtype": "bfloat16",
}

GRANITE_40_H_SMALL = {
    "architectures": ["GraniteMoeHybridForCausalLM"],
    "hidden_size": 4096,
    "layer_types": ["mamba"] * 5 + ["attention"] + ["mamba"] * 34,
    "mamba_d_head": 64,
    "mamba_d_state": 128,
    "mamba_n_groups": 1,
    "mamba_n_heads": 128,
    "model_type": "granitemoehybrid",
    "num_attention_heads": 32,
    "num_experts_per_tok": 10,
    "num_hidden_layers": 40,
    "num_key_value_heads": 8,
    "num_local_experts": 72,
    "torch_dtype": "bfloat16",
}

JAMBA = {
    "architectures": ["JambaForCausalLM"],
    "attn_layer_offset": 4,
    "attn_layer_period": 8,
    "hidden_size": 4096,
    "mamba_d_state": 16,
    "model_type": "jamba",
    "num_attention_heads": 32,
    "num_experts": 16,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "torch_dtype": "bfloat16",
}

QWEN3_NEXT = {
    "architectures": ["Qwen3NextForCausalLM"],
    "full_attention_interval": 4,
    "head_dim": 256,
    "hidden_size": 2048,
    "linear_num_value_heads": 32,
    "model_type": "qwen3_next",
    "num_attention_heads": 16,
    "num_experts": 512,
    "num_hidden_layers": 48,
    "num_key_value_heads": 2,
    "torch_dtype": "bfloat16",
}

T5_BASE = {
    "architectures": ["T5ForConditionalGeneration"],
    "d_ff": 3072,
    "d_kv": 64,
    "d_model": 768,
    "is_encoder_decoder": True,
    "model_type": "t5",
    "num_decoder_layers": 12,
    "num_heads": 12,
    "num_layers": 12,
}

BART_LARGE = {
    "architectures": ["BartForConditionalGeneration"],
    "d_model": 1024,
    "decoder_attention_heads": 16,
    "decoder_layers": 12,
    "encoder_attention_heads": 16,
    "encoder_layers": 12,
    "is_encoder_decoder": True,
    "model_type": "bart",
    "torch_dtype": "float32",
}


def block(config, name="org/model"):
    out = model_block_from_hf_config(config, name)
    ModelSpec.model_validate(out)  # every block is a valid spec.model
    return out


def test_llama_dense_gqa():
    assert block(LLAMA_31_8B, "meta-llama/Llama-3.1-8B-Instruct") == {
        "name": "meta-llama/Llama-3.1-8B-Instruct", "family": "dense", "dtype": "bfloat16",
        "numKVHeads": 8, "headSize": 128, "numHiddenLayers": 32, "slidingWindow": 0,
    }


def test_kv_heads_default_to_attention_heads_and_head_from_hidden():
    cfg = {k: v for k, v in LLAMA_31_8B.items() if k != "num_key_value_heads"}
    out = block(cfg)
    assert out["numKVHeads"] == 32 and out["headSize"] == 4096 // 32


def test_mixtral_is_moe():
    out = block(MIXTRAL_8X7B)
    assert (out["family"], out["numKVHeads"], out["headSize"], out["numHiddenLayers"]) == (
        "moe", 8, 128, 32)
    assert out["slidingWindow"] == 0


def test_qwen3_moe_head_dim_wins_over_hidden_size():
    out = block(QWEN3_30B_A3B)
    assert (out["family"], out["numKVHeads"], out["headSize"], out["numHiddenLayers"]) == (
        "moe", 4, 128, 48)


def test_deepseek_v3_mla_counts_one_latent_head():
    out = block(DEEPSEEK_V3)
    assert out["family"] == "mla"
    assert out["numKVHeads"] == 1
    assert out["headSize"] == 512 + 64
    assert out["numHiddenLayers"] == 61  # the MTP layer is not counted


def test_deepseek_v32_is_sparse_mla():
    out = block(DEEPSEEK_V32)
    assert (out["family"], out["numKVHeads"], out["headSize"]) == ("sparse-mla", 1, 576)
    # index_topk alone is enough
    cfg = {**DEEPSEEK_V3, "index_topk": 2048}
    assert block(cfg)["family"] == "sparse-mla"


def test_qwen25_vl_top_level_text_fields():
    out = block(QWEN25_VL_7B)
    assert out == {
        "name": "org/model", "family": "multimodal", "dtype": "bfloat16", "numKVHeads": 4,
        "headSize": 128, "numHiddenLayers": 28, "slidingWindow": 0,  # use_sliding_window false
    }


def test_gemma3_text_config_and_sliding_window():
    out = block(GEMMA3_27B_IT)
    assert (out["family"], out["numKVHeads"], out["headSize"], out["numHiddenLayers"]) == (
        "multimodal", 16, 128, 62)
    assert out["slidingWindow"] == 1024
    assert out["dtype"] == "bfloat16"  # from the top level


def test_gemma2_sliding_window_and_float32():
    out = block(GEMMA2_9B)
    assert (out["family"], out["numKVHeads"], out["headSize"], out["numHiddenLayers"]) == (
        "dense", 8, 256, 42)
    assert out["slidingWindow"] == 4096
    assert out["dtype"] == "float32"


def test_layer_types_decide_sliding_window():
    full = {**LLAMA_31_8B, "sliding_window": 4096, "layer_types": ["full_attention"] * 32}
    assert block(full)["slidingWindow"] == 0
    mixed = {**full, "layer_types": ["sliding_attention", "full_attention"] * 16}
    assert block(mixed)["slidingWindow"] == 4096


def test_nemotron_h_hybrid_mamba2():
    out = block(NEMOTRON_H_8B)
    assert out["family"] == "hybrid-ssm" and out["mambaType"] == "mamba2"
    assert (out["numKVHeads"], out["headSize"], out["numHiddenLayers"]) == (8, 128, 52)


def test_granite_40_h_hybrid_beats_moe():
    out = block(GRANITE_40_H_SMALL)
    assert out["family"] == "hybrid-ssm" and out["mambaType"] == "mamba2"
    assert (out["numKVHeads"], out["headSize"], out["numHiddenLayers"]) == (8, 128, 40)


def test_hybrid_from_layer_types_without_known_architecture():
    cfg = {**GRANITE_40_H_SMALL, "architectures": ["SomeNewHybridForCausalLM"]}
    out = block(cfg)
    assert out["family"] == "hybrid-ssm" and out["mambaType"] == "mamba2"


def test_jamba_mamba1_and_qwen3_next_gdn():
    jamba = block(JAMBA)
    assert (jamba["family"], jamba["mambaType"], jamba["numHiddenLayers"]) == (
        "hybrid-ssm", "mamba1", 32)
    nxt = block(QWEN3_NEXT)
    assert (nxt["family"], nxt["mambaType"], nxt["numKVHeads"], nxt["headSize"]) == (
        "hybrid-ssm", "gdn", 2, 256)


def test_mamba_type_only_for_hybrid():
    for cfg in (LLAMA_31_8B, DEEPSEEK_V3, QWEN25_VL_7B, QWEN3_30B_A3B):
        assert "mambaType" not in block(cfg)


def test_t5_encoder_decoder():
    out = block(T5_BASE, "google-t5/t5-base")
    assert out["family"] == "encoder-decoder"
    assert (out["numKVHeads"], out["headSize"], out["numHiddenLayers"]) == (12, 64, 12)
    assert out["dtype"] == "bfloat16"  # no torch_dtype: the default


def test_bart_encoder_decoder():
    out = block(BART_LARGE)
    assert out["family"] == "encoder-decoder"
    assert (out["numKVHeads"], out["headSize"], out["numHiddenLayers"]) == (16, 64, 12)
    assert out["dtype"] == "float32"


@pytest.mark.parametrize("raw,expected", [
    ("bfloat16", "bfloat16"), ("float16", "float16"), ("float32", "float32"),
    ("torch.float16", "float16"), ("bf16", "bfloat16"), ("half", "float16"),
])
def test_dtype_mapping(raw, expected):
    assert block({**LLAMA_31_8B, "torch_dtype": raw})["dtype"] == expected


def test_dtype_key_of_newer_transformers_and_default():
    cfg = {k: v for k, v in LLAMA_31_8B.items() if k != "torch_dtype"}
    assert block(cfg)["dtype"] == "bfloat16"
    assert block({**cfg, "dtype": "float16"})["dtype"] == "float16"


def test_unknown_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="torch_dtype"):
        model_block_from_hf_config({**LLAMA_31_8B, "torch_dtype": "int8"}, "x")


def test_name_defaults_to_name_or_path():
    out = model_block_from_hf_config({**LLAMA_31_8B, "_name_or_path": "/models/llama"})
    assert out["name"] == "/models/llama"
    with pytest.raises(ValueError, match="name"):
        model_block_from_hf_config(LLAMA_31_8B)


@pytest.mark.parametrize("missing", ["num_hidden_layers", "num_attention_heads"])
def test_missing_key_is_named(missing):
    cfg = {k: v for k, v in LLAMA_31_8B.items() if k != missing}
    with pytest.raises(ValueError, match=missing):
        model_block_from_hf_config(cfg, "x")


def test_missing_hidden_size_is_named():
    cfg = {k: v for k, v in LLAMA_31_8B.items() if k != "hidden_size"}
    with pytest.raises(ValueError, match="hidden_size"):
        model_block_from_hf_config(cfg, "x")


def test_mla_missing_rope_dim_is_named():
    cfg = {k: v for k, v in DEEPSEEK_V3.items() if k != "qk_rope_head_dim"}
    with pytest.raises(ValueError, match="qk_rope_head_dim"):
        model_block_from_hf_config(cfg, "x")


def test_not_a_mapping():
    with pytest.raises(ValueError):
        model_block_from_hf_config(["not", "a", "config"], "x")  # type: ignore[arg-type]


EXPECTED_FILES = {
    "Llama-3.1-8B-Instruct.config.json": ("dense", 8, 128, 32),
    "Qwen3-30B-A3B.config.json": ("moe", 4, 128, 48),
    "DeepSeek-V3.config.json": ("mla", 1, 576, 61),
    "Qwen2.5-VL-7B-Instruct.config.json": ("multimodal", 4, 128, 28),
}


@pytest.mark.parametrize("filename", sorted(EXPECTED_FILES))
def test_shipped_hf_configs(filename):
    config = json.loads((HF_CONFIGS / filename).read_text())
    out = block(config)
    assert (out["family"], out["numKVHeads"], out["headSize"], out["numHiddenLayers"]) == \
        EXPECTED_FILES[filename]
    assert out["slidingWindow"] == 0 and out["dtype"] == "bfloat16"


def test_shipped_configs_match_the_examples():
    """The example deployments describe these models with the numbers model_info derives."""
    import yaml

    pairs = {
        "Llama-3.1-8B-Instruct.config.json": "llama-3.1-8b-basic.yaml",
        "Qwen3-30B-A3B.config.json": "qwen3-30b-a3b-moe-p4-d2.yaml",
        "DeepSeek-V3.config.json": "deepseek-v3-mla-dcp8.yaml",
        "Qwen2.5-VL-7B-Instruct.config.json": "qwen2.5-vl-7b-multimodal.yaml",
    }
    for cfg_name, example in pairs.items():
        spec_model = yaml.safe_load(
            (ROOT / "deploy" / "examples" / "accepted" / example).read_text())["spec"]["model"]
        derived = model_block_from_hf_config(
            json.loads((HF_CONFIGS / cfg_name).read_text()), spec_model["name"])
        for key, value in derived.items():
            assert spec_model.get(key, 0 if key == "slidingWindow" else None) == value, (
                cfg_name, key)


def test_pdctl_model_info_prints_the_block():
    """The console script reads a shipped config.json and prints the same spec.model block."""
    import subprocess

    from tests.helpers import pdctl

    path = HF_CONFIGS / "DeepSeek-V3.config.json"
    proc = subprocess.run(
        [pdctl(), "model-info", str(path),
         "--name", "deepseek-ai/DeepSeek-V3-0324", "-o", "json"],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"model": model_block_from_hf_config(
        json.loads(path.read_text()), "deepseek-ai/DeepSeek-V3-0324")}
