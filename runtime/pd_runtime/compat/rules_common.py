"""Rules that hold for every engine type: the pair is one engine, one model family, and a
version the rules know."""

from __future__ import annotations

from .pool import ResolvedPool as Pool
from .rule import REJECT, WARN, Rule
from .versions import KNOWN_SPAN, OLDEST_KNOWN, fmt_minor, image_version_conflict, rules_minor

OLDEST = fmt_minor(OLDEST_KNOWN)


def _version_position(x: Pool) -> str:
    """"known", "older", "newer" or "missing" for a vLLM pool ("known" for other engines)."""
    if x.engine_type != "vllm" or x.engine_version is None:
        return "known"
    return rules_minor(x.engine_version).position


def _unknown_version(x: Pool) -> bool:
    """A vLLM version that is not one the rules know and not older than all of them."""
    return _version_position(x) in ("newer", "missing")


def _image_conflict(x: Pool) -> bool:
    return image_version_conflict(x.engine_image, x.engine_version) is not None


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
        summary="A vLLM version newer than the known range gets the newest rules.",
        when=lambda p, d: _unknown_version(p) or _unknown_version(d),
        fields=("p.engine_version", "d.engine_version"),
        message="vLLM {p.engine_version} / {d.engine_version} is outside the versions these "
        f"rules know ({KNOWN_SPAN}); the newest rules are applied",
        fix="check the release notes of this version, or upgrade pd-operator",
        source=f"pd-operator rule data (vLLM {KNOWN_SPAN})",
    ),
    Rule(
        id="ENGINE-VERSION-TOO-OLD", severity=WARN,
        summary="A vLLM version older than the oldest known gets the oldest rules.",
        when=lambda p, d: "older" in (_version_position(p), _version_position(d)),
        fields=("p.engine_version", "d.engine_version"),
        message="vLLM {p.engine_version} / {d.engine_version} is older than the oldest release "
        f"these rules know ({OLDEST}); the {OLDEST} rules are applied, and what changed "
        "before it is not checked",
        fix=f"use vLLM {OLDEST} or newer",
        source=f"pd-operator rule data (vLLM {KNOWN_SPAN})",
    ),
    Rule(
        id="ENGINE-VERSION-IMAGE-CONFLICT", severity=REJECT,
        summary="An explicit engine.version names the release the image tag names.",
        when=lambda p, d: _image_conflict(p) or _image_conflict(d),
        fields=("p.engine_version", "p.engine_image", "d.engine_version", "d.engine_image"),
        message="engine.version and the image tag name different releases (prefill: version "
        "{p.engine_version}, image {p.engine_image}; decode: version {d.engine_version}, "
        "image {d.engine_image}); the engine reports the image's version, so the rules and "
        "the hash would be chosen for a release that does not run",
        fix="drop engine.version (the tag gives it) or set it to the image tag's version",
        source="pd-operator: the version picks the rule set and is a compatibility-hash factor",
    ),
)
