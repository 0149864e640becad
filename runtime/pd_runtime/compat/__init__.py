"""Compatibility rules as data, the engine that evaluates them and the hash (imports no torch).

    from pd_runtime.compat import ResolvedPool, check_pools
    decision = check_pools(prefill_pool, decode_pool, policy="Strict")
"""

from .engine import POLICIES, Decision, check_pools
from .families import FAMILIES, Family
from .pool import (
    BUNDLED_MODELS,
    ENGINE_HTTP_PORT,
    ResolvedPool,
    Speculative,
    make_pool,
    side_channel_ports,
)
from .rule import REJECT, WARN, Rule, Verdict

__all__ = [
    "BUNDLED_MODELS", "ENGINE_HTTP_PORT", "FAMILIES", "POLICIES", "REJECT", "WARN", "Decision",
    "Family", "ResolvedPool", "Rule", "Speculative", "Verdict", "check_pools", "make_pool",
    "side_channel_ports",
]
