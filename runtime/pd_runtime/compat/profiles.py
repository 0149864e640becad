"""A profile is the rule set and the hash recipe for one engine (and one vLLM minor)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

from . import hashing, rules_builtin, rules_common, rules_known_bugs, rules_vllm
from .pool import ResolvedPool
from .rule import Rule
from .versions import Minor, known_version, rules_minor


@dataclass(frozen=True)
class Profile:
    label: str
    rules: tuple[Rule, ...]
    factors: Callable[[ResolvedPool], tuple[dict[str, Any] | None, str | None]]

    def factors_of(self, pool: ResolvedPool) -> dict[str, Any] | None:
        return self.factors(pool)[0]



@cache
def vllm_rules(minor: Minor, family: str) -> tuple[Rule, ...]:
    table = rules_common.RULES + rules_vllm.RULES + rules_known_bugs.RULES
    return tuple(r for r in table if r.applies_to(family, minor))


def _vllm_factors(pool: ResolvedPool):
    version = known_version(pool.engine_version)
    if version is None:
        return None, "the engine version is unknown to the rules, so the hash factors are too"
    return hashing.vllm_factors(pool, version)


def _builtin_factors(pool: ResolvedPool):
    if pool.engine_version is None:
        return None, "the runtime version is unknown"
    return hashing.builtin_factors(
        runtime_version=pool.engine_version,
        model=pool.model_name,
        dtype=pool.dtype,
        num_kv_heads=pool.num_kv_heads,
        head_size=pool.head_size,
        num_hidden_layers=pool.num_hidden_layers,
        cache_dtype=pool.kv_cache_dtype,
        family=pool.family,
    ), None


def select(p: ResolvedPool, d: ResolvedPool) -> Profile:
    """The profile for a pair: by the prefill pool's engine type and version."""
    if p.engine_type == "builtin":
        return Profile("builtin", rules_common.RULES + rules_builtin.rules_for(p.family),
                       _builtin_factors)
    chosen = rules_minor(p.engine_version)  # older than known: the oldest rules, not the newest
    return Profile(chosen.label, vllm_rules(chosen.minor, p.family), _vllm_factors)
