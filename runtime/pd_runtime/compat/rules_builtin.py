"""The bundled runtime's profile: the newest vLLM rules, minus what the runtime's transfer
planner handles itself, plus rules of its own."""

from __future__ import annotations

from functools import lru_cache

from . import rules_vllm
from .rule import Rule
from .versions import NEWEST_KNOWN

# Rule ids of the vLLM profile that the bundled runtime does not need (it handles the case).
LIFTED: frozenset[str] = frozenset()

RULES: tuple[Rule, ...] = ()


@lru_cache(maxsize=None)
def rules_for(family: str) -> tuple[Rule, ...]:
    inherited = tuple(
        r for r in rules_vllm.RULES
        if r.applies_to(family, NEWEST_KNOWN) and r.id not in LIFTED
    )
    return inherited + tuple(r for r in RULES if r.applies_to(family, NEWEST_KNOWN))
