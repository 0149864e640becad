"""Compatibility rules as data, the engine that evaluates them and the hash (imports no torch).

    from pd_runtime.compat import ResolvedPool, check_pools
    decision = check_pools(prefill_pool, decode_pool, policy="Strict")
"""

from .engine import POLICIES, Decision, check_pools
from .pool import ResolvedPool, Speculative, make_pool
from .rule import REJECT, WARN, Rule, Verdict

__all__ = [
    "POLICIES", "REJECT", "WARN", "Decision", "ResolvedPool", "Rule", "Speculative", "Verdict",
    "check_pools", "make_pool",
]
