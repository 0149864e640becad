"""Evaluate the rules for a prefill/decode pair: the one entry point every caller uses
(admission webhook, `pdctl check`, the runtime handshake, `pd-runtime transfer-test`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import hashing, profiles
from .pool import ResolvedPool
from .rule import REJECT, WARN, Rule, Verdict

POLICIES = ("Strict", "Warn", "Disabled")


@dataclass
class Decision:
    accepted: bool
    verdicts: list[Verdict]
    prefill_hash: str | None = None
    decode_hash: str | None = None
    hash_notes: list[str] = field(default_factory=list)
    rules_version: str | None = None  # which version's rules were applied

    @property
    def rejections(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.severity == REJECT]

    @property
    def warnings(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.severity == WARN]

    def to_dict(self) -> dict[str, Any]:
        """The one JSON form of a decision (`pdctl check -o json`, the rendered ConfigMap)."""
        return {
            "accepted": self.accepted,
            "verdicts": [v.to_dict() for v in self.verdicts],
            "prefillHash": self.prefill_hash,
            "decodeHash": self.decode_hash,
            "hashNotes": self.hash_notes,
            "rules": self.rules_version,
        }


def _field_paths(rule: Rule, p: ResolvedPool, d: ResolvedPool) -> list[str]:
    paths: list[str] = []
    for ref in rule.fields:
        side, name = ref.split(".", 1)
        path = (p if side == "p" else d).path(name)
        if path not in paths:
            paths.append(path)
    return paths


def _verdict(rule: Rule, p: ResolvedPool, d: ResolvedPool) -> Verdict:
    return Verdict(
        rule=rule.id,
        severity=rule.severity,
        fields=_field_paths(rule, p, d),
        message=rule.message.format(p=p, d=d),
        fix=rule.fix.format(p=p, d=d),
        source=rule.source,
    )


def evaluate(rules: tuple[Rule, ...], p: ResolvedPool, d: ResolvedPool) -> list[Verdict]:
    """Every rule whose condition holds, minus those superseded by a rule that also fired."""
    fired = [r for r in rules if r.when(p, d)]
    fired_ids = {r.id for r in fired}
    return [_verdict(r, p, d) for r in fired if not fired_ids.intersection(r.unless)]


def _apply_policy(verdicts: list[Verdict], policy: str) -> list[Verdict]:
    if policy != "Warn":
        return verdicts
    return [
        Verdict(v.rule, WARN, v.fields, v.message, v.fix, v.source,
                policy_note="would reject under policy Strict")
        if v.severity == REJECT else v
        for v in verdicts
    ]


def _hash(factors: dict | None) -> str | None:
    return hashing.hash_factors(factors) if factors is not None else None


def check_pools(p: ResolvedPool, d: ResolvedPool, policy: str = "Strict") -> Decision:
    """Judge a pair under `policy` (Strict rejects, Warn downgrades, Disabled skips)."""
    profile = profiles.select(p, d)
    verdicts = [] if policy == "Disabled" else evaluate(profile.rules, p, d)
    verdicts = _apply_policy(verdicts, policy)
    decision = Decision(
        accepted=not any(v.severity == REJECT for v in verdicts),
        verdicts=verdicts,
        rules_version=profile.label,
    )
    (p_factors, p_note), (d_factors, d_note) = profile.factors(p), profile.factors(d)
    decision.prefill_hash = _hash(p_factors)
    # a matching pair (the usual case) has equal factors: hash them once
    decision.decode_hash = decision.prefill_hash if d_factors == p_factors else _hash(d_factors)
    decision.hash_notes = [n for n in (p_note and f"prefill: {p_note}",
                                       d_note and f"decode: {d_note}") if n]
    return decision

