"""Rules that hold for every engine type: the pair is one engine, one model family, and a
version the rules know."""

from __future__ import annotations

from .pool import ResolvedPool as Pool
from .rule import REJECT, WARN, Rule
from .versions import known_version


def _version_unknown(x: Pool) -> bool:
    return x.engine_type == "vllm" and x.engine_version is not None \
        and known_version(x.engine_version) is None


RULES: tuple[Rule, ...] = (
    Rule(
        id="ENGINE-TYPE-MATCH", severity=REJECT,
        summary="Both pools run the same engine type.",
        when=lambda p, d: p.engine_type != d.engine_type,
        fields=("p.engine_type", "d.engine_type"),
        message="prefill runs engine {p.engine_type} and decode runs {d.engine_type}; they "
        "speak different handshakes",
        fix="use one engine.type for both pools",
        source="pd-operator: vLLM and the bundled runtime do not interoperate",
    ),
    Rule(
        id="MODEL-FAMILY-MATCH", severity=REJECT,
        summary="Both pools describe the same model family.",
        when=lambda p, d: p.family != d.family,
        fields=("p.family", "d.family"),
        message="prefill declares model family {p.family} and decode {d.family}",
        fix="describe the same model on both pools",
        source="pd-operator: the family selects the rules and the KV layout",
    ),
    Rule(
        id="ENGINE-VERSION-MISSING", severity=WARN,
        summary="The engine version is needed to pick rules and predict the hash.",
        when=lambda p, d: p.engine_version is None or d.engine_version is None,
        fields=("p.engine_image", "d.engine_image"),
        message="no engine version: the image ({p.engine_image} / {d.engine_image}) has no "
        "version tag and engine.version is not set; the newest rules are applied and no hash "
        "is predicted",
        fix="set spec.engine.version (required with digest-only images)",
        source="pd-operator: rules carry version ranges",
    ),
    Rule(
        id="ENGINE-VERSION-UNKNOWN", severity=WARN,
        summary="An engine version outside the known range gets the newest rules.",
        when=lambda p, d: _version_unknown(p) or _version_unknown(d),
        fields=("p.engine_version", "d.engine_version"),
        message="vLLM {p.engine_version} / {d.engine_version} is outside the versions these "
        "rules know (0.11-0.33); the newest rules are applied",
        fix="check the release notes of this version, or upgrade pd-operator",
        source="pd-operator rule data (vLLM 0.11-0.33)",
    ),
)
