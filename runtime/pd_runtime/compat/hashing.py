"""The NIXL compatibility hash, built exactly as the engine builds it.

vLLM (`vllm.config.utils.hash_factors`) hashes `json.dumps(factors, sort_keys=True)` with the
default separators and ASCII escaping, UTF-8 encoded, SHA-256 hex. Which factors go in depends on
the vLLM version (reference: vllm-nixl-rules.md §1 and §12). The builtin runtime uses the same
construction with its own version and protocol number.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from . import rules_vllm
from .versions import NIXL_CONNECTOR_VERSION

# The builtin runtime's own protocol number; bump it when the handshake metadata changes.
BUILTIN_PROTOCOL_VERSION = 1


def hash_factors(factors: dict[str, Any]) -> str:
    """SHA-256 hex of the sorted-key JSON of `factors`, as vLLM computes it."""
    text = json.dumps(factors, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def differing_factors(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Names of the factors whose values differ (or exist on one side only), sorted."""
    return sorted(k for k in set(a) | set(b) if a.get(k, object()) != b.get(k, object()))


def builtin_factors(
    *,
    runtime_version: str,
    model: str,
    dtype: str,
    num_kv_heads: int,
    head_size: int,
    num_hidden_layers: int,
    cache_dtype: str,
    family: str,
) -> dict[str, Any]:
    """The factors the bundled runtime hashes. Geometry (TP, block size, layout) is left out on
    purpose: the transfer planner handles differences there, as vLLM's handshake does."""
    return {
        "runtime": "pd-runtime",
        "runtime_version": runtime_version,
        "protocol_version": BUILTIN_PROTOCOL_VERSION,
        "model": model,
        "dtype": dtype if dtype.startswith("torch.") else f"torch.{dtype}",
        "num_kv_heads": num_kv_heads,
        "head_size": head_size,
        "num_hidden_layers": num_hidden_layers,
        "cache_dtype": cache_dtype,
        "family": family,
    }


def vllm_factors(pool, version) -> tuple[dict[str, Any] | None, str | None]:
    """The factors vLLM `version` (an EngineVersion) hashes for `pool` (a ResolvedPool).

    Returns (factors, None), or (None, why) when a factor is unknown before launch. Never
    guesses: an auto attention backend, an eagle-family draft (its aux layer ids come from the
    draft's config) or a model redirect leave the hash unknown.
    """
    minor = version.minor
    if minor not in NIXL_CONNECTOR_VERSION:
        return None, f"the NIXL connector version of vLLM {version.text} is not known"
    connector_version = NIXL_CONNECTOR_VERSION[minor]
    if connector_version is None:
        return None, f"vLLM {version.text} has no compatibility hash"
    if pool.attention_backend == "auto":
        return None, "attention backend 'auto' is chosen by vLLM at start-up from the GPU"
    if "VLLM_MODEL_REDIRECT_PATH" in pool.env:
        return None, "VLLM_MODEL_REDIRECT_PATH rewrites the model string at start-up"
    factors: dict[str, Any] = {
        "vllm_version": version.text,
        "nixl_connector_version": connector_version,
        "model": pool.model_name,
        "dtype": f"torch.{pool.dtype}",
        "num_kv_heads": pool.num_kv_heads,
        "head_size": pool.head_size,
        "num_hidden_layers": pool.num_hidden_layers,
        "attn_backend_name": pool.attention_backend,
        "cache_dtype": pool.kv_cache_dtype,
    }
    if (0, 16) <= minor <= (0, 28):
        factors["cross_layers_blocks"] = rules_vllm.effective_cross_layers(pool)
    if minor >= (0, 18):
        factors["is_hma_enabled"] = pool.hma
    if minor >= (0, 28):
        spec = pool.speculative
        if spec is not None and spec.is_eagle_family:
            return None, (
                "the eagle-family speculative_config factor includes auxiliary layer ids read "
                "from the draft model's config at start-up"
            )
        factors["speculative_config"] = None
        factors["transfer_mode"] = "push" if pool.is_push else "pull"
    return factors, None
