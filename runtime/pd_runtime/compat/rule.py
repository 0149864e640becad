"""The shape of a rule and of a verdict. The rule tables themselves are in rules_vllm.py and
rules_builtin.py; engine.py evaluates them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .pool import ResolvedPool
from .versions import ANY, VersionRange

REJECT = "reject"
WARN = "warn"

Condition = Callable[[ResolvedPool, ResolvedPool], bool]


@dataclass(frozen=True)
class Rule:
    """One compatibility rule.

    `fields` names pool attributes prefixed by the side they are read from (`p.tp`, `d.tp`);
    each verdict turns them into the JSON paths the values came from. `message` and `fix` are
    `str.format` templates over `p` and `d` (the prefill and decode ResolvedPool).
    `unless` lists rules that supersede this one: when any of them fires, this one stays quiet.
    """

    id: str
    severity: str
    summary: str
    when: Condition
    fields: tuple[str, ...]
    message: str
    fix: str
    source: str
    versions: VersionRange = ANY
    families: frozenset[str] | None = None
    unless: tuple[str, ...] = ()
    checklist: str | None = None  # item of the admission checklist (vllm-nixl-rules.md §14)

    def applies_to(self, family: str, minor: tuple[int, int]) -> bool:
        in_family = self.families is None or family in self.families
        return in_family and self.versions.contains(minor)


@dataclass(frozen=True)
class Verdict:
    rule: str
    severity: str
    fields: list[str]
    message: str
    fix: str
    source: str = ""
    policy_note: str | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The one JSON form of a verdict (the status keeps these keys but policyNote)."""
        out: dict[str, Any] = {
            "rule": self.rule,
            "severity": self.severity,
            "fields": self.fields,
            "message": self.message,
            "fix": self.fix,
            "source": self.source,
        }
        if self.policy_note:
            out["policyNote"] = self.policy_note
        return out
