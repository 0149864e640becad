"""The predicted hash equals what vLLM computes (reference values computed by vLLM 0.32.0)."""

import copy

import pytest

from pd_operator.resolve import resolve
from pd_operator.validate import parse_object
from pd_runtime.compat import check_pools
from pd_runtime.compat.hashing import hash_factors
from tests.helpers import LLAMA_8B, sample_pdd

LLAMA_HASH = "6ed27ce6d11215010cb868b80a28e0fb089c62db684f14f7bf47b65c78286379"
LLAMA_FP8_HASH = "8b2ecce1d9a699abcd7c0cf650bbd7db5c5127d4262f2bda738c8db9380a0690"

BASE = sample_pdd("0.32.0", name="llama", model={**LLAMA_8B, "dtype": "bfloat16"},
                  engine={"type": "vllm"})


def decide(obj):
    p, d = resolve(parse_object(obj).spec)
    return check_pools(p, d)


def test_factors_hash_like_vllm():
    factors = {
        "vllm_version": "0.32.0", "nixl_connector_version": 14,
        "model": "meta-llama/Llama-3.1-8B-Instruct", "dtype": "torch.bfloat16",
        "num_kv_heads": 8, "head_size": 128, "num_hidden_layers": 32,
        "attn_backend_name": "FLASH_ATTN", "cache_dtype": "auto", "is_hma_enabled": True,
        "speculative_config": None, "transfer_mode": "pull",
    }
    assert hash_factors(factors) == LLAMA_HASH


def test_spec_predicts_vllm_032_hash():
    decision = decide(BASE)
    assert decision.prefill_hash == decision.decode_hash == LLAMA_HASH


def test_fp8_cache_dtype_changes_hash():
    obj = copy.deepcopy(BASE)
    for role in ("prefill", "decode"):
        obj["spec"][role]["kvCacheDtype"] = "fp8"
    assert decide(obj).prefill_hash == LLAMA_FP8_HASH


def test_version_from_field_overrides_nothing_when_image_tag_agrees():
    obj = copy.deepcopy(BASE)
    obj["spec"]["engine"]["version"] = "0.32.0"
    assert decide(obj).prefill_hash == LLAMA_HASH


@pytest.mark.parametrize("change,reason", [
    ({"attentionBackend": "auto"}, "attention backend 'auto'"),
    ({"speculative": {"method": "eagle3", "model": "org/draft"}}, "auxiliary layer ids"),
])
def test_unknown_factor_gives_no_hash_and_says_why(change, reason):
    obj = copy.deepcopy(BASE)
    for role in ("prefill", "decode"):
        obj["spec"][role].update(change)
    decision = decide(obj)
    assert decision.prefill_hash is None and decision.decode_hash is None
    assert any(reason in note for note in decision.hash_notes)


def test_version_without_hash():
    obj = copy.deepcopy(BASE)
    obj["spec"]["engine"]["image"] = "vllm/vllm-openai:v0.12.0"
    decision = decide(obj)
    assert decision.prefill_hash is None
    assert "no compatibility hash" in decision.hash_notes[0]


def test_hash_factors_change_by_version():
    obj = copy.deepcopy(BASE)
    obj["spec"]["engine"]["image"] = "vllm/vllm-openai:v0.33.0"
    h33 = decide(obj).prefill_hash
    obj["spec"]["engine"]["image"] = "vllm/vllm-openai:v0.14.0"
    h14 = decide(obj).prefill_hash
    assert len({h33, h14, LLAMA_HASH}) == 3
