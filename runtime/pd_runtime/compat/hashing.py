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
