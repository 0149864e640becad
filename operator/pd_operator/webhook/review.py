"""Admission logic (pure): an AdmissionReview dict in, an AdmissionReview response dict out.

Validation (CREATE and UPDATE) runs the compatibility engine: under Strict every rejecting rule is
listed in one message (id, fields, fix, source); warnings become admission warnings, which kubectl
prints. On UPDATE, changing the pairing facts of one pool only is rejected (UPDATE-ONE-POOL): the
running pods of the other pool would no longer be able to talk to the new ones. That check runs
under the stricter of the old and the new validation.policy, so setting Disabled in the same
update does not skip it. A policy the administrator forbids (cluster-wide with
`--forbid-validation-policies`, chart value validation.forbiddenPolicies; per namespace with the
namespace label in namespaces.py) is rejected (POLICY-FORBIDDEN). Under Disabled the admission
answer warns that nothing was checked.

Mutation writes the resolved defaults into the stored object (kvCacheLayout of each pool,
kvTransfer.sideChannelPort, engine versions read from image tags, validation.policy), so what
`kubectl get -o yaml` shows is what runs.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

from pd_runtime.compat import Decision, ResolvedPool, Verdict, profiles
from pd_runtime.compat.versions import version_from_image

from ..api.v1alpha1 import PDDeploymentSpec, name_error
from ..resolve import DEFAULT_LAYOUT, resolve
from ..validate import SpecError, decide_spec, parse_spec
from .namespaces import FORBID_LABEL

UPDATE_RULE = "UPDATE-ONE-POOL"
FORBIDDEN_RULE = "POLICY-FORBIDDEN"
POLICIES = ("Strict", "Warn", "Disabled")  # strictest first
DISABLED_WARNING = ("validation.policy is Disabled: the pools were not checked; set it to "
                    "Strict (or Warn) to have them checked")
MAX_WARNING_LEN = 500  # the API server limits the total size of warning headers
MAX_PROBLEMS_SHOWN = 20  # schema problems listed in one rejection (the rest are counted)
MAX_WARNINGS = 20
# JSON values one spec may hold before it is judged: the CRD's bounds allow a few thousand, so
# a flood of list items is refused after a cheap count instead of a schema error per item.
REVIEW_MAX_NODES = 20_000


def too_many_nodes(value: Any, limit: int = REVIEW_MAX_NODES) -> bool:
    """True when `value` holds more than `limit` JSON values (stops counting at the limit)."""
    stack, seen = [value], 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > limit:
            return True
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False

# Pool facts that decide whether the two pools can exchange KV, beyond the engine's own hash
# factors (which cover engine version, model, dtype, heads, layers, backend, KV dtype, HMA,
# speculation and transfer mode): the transfer geometry and the connector settings that the
# handshake or the transfer plan depends on. Replicas, templates, args and env are not in it.
PAIRING_FIELDS = (
    "engine_type", "engine_image", "engine_version", "model_name", "model_revision", "family",
    "dtype", "num_kv_heads", "head_size", "num_hidden_layers", "sliding_window", "mamba_type",
    "tp", "pp", "dp", "dcp", "block_size", "attention_backend", "kv_cache_dtype",
    "kv_cache_layout", "kv_cache_scales", "hma", "speculative", "connector", "backends",
    "buffer_device", "enforce_handshake_compat", "enable_permute_local_kv",
    "enable_cross_layers_blocks", "side_channel_port",
)


@dataclass
class Outcome:
    allowed: bool
    message: str = ""
    warnings: list[str] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)  # what fired (for metrics)
    code: int = 403
    patch: list[dict[str, Any]] | None = None


# ------------------------------------------------------------------------------- validation
def pairing_facts(pool: ResolvedPool, other: ResolvedPool) -> dict[str, Any]:
    """Everything that must stay in lockstep between the pools: the hash factors of the
    engine profile (when predictable) plus PAIRING_FIELDS."""
    facts: dict[str, Any] = {name: getattr(pool, name) for name in PAIRING_FIELDS}
    p, d = (pool, other) if pool.role == "prefill" else (other, pool)
    factors = profiles.select(p, d).factors_of(pool)
    facts["hash_factors"] = factors
    return facts


def changed_facts(old: ResolvedPool, old_other: ResolvedPool, new: ResolvedPool,
                  new_other: ResolvedPool) -> list[str]:
    a, b = pairing_facts(old, old_other), pairing_facts(new, new_other)
    names = [k for k in PAIRING_FIELDS if a[k] != b[k]]
    if not names and a["hash_factors"] != b["hash_factors"]:
        names.append("hash_factors")
    return names


def _one_pool_update(old: PDDeploymentSpec, new: PDDeploymentSpec) -> Verdict | None:
    op, od = resolve(old)
    np_, nd = resolve(new)
    p_changed = changed_facts(op, od, np_, nd)
    d_changed = changed_facts(od, op, nd, np_)
    if bool(p_changed) == bool(d_changed):
        return None  # neither pool's pairing changed, or both changed together
    if p_changed:
        role, names, pool, other = "prefill", p_changed, np_, "decode"
    else:
        role, names, pool, other = "decode", d_changed, nd, "prefill"
    paths = [pool.path(n) for n in names if n != "hash_factors"] or [f"spec.{role}"]
    return Verdict(
        rule=UPDATE_RULE, severity="reject", fields=paths,
        message=(f"this update changes {', '.join(names)} of the {role} pool only; the running "
                 f"{other} pods would keep the old values and stop being able to exchange KV "
                 f"with the new {role} pods"),
        fix=(f"change the same fields of spec.{other} in the same update (both pools roll "
             f"together), or create a new PDDeployment next to this one"),
        source="pd-operator: pools of one PDDeployment keep matching pairing facts",
    )


def format_verdict(v: Verdict) -> str:
    text = f"[{v.rule}] {v.message}; fields: {', '.join(v.fields)}; fix: {v.fix}"
    if v.source:
        text += f" (source: {v.source})"
    return text


def rejection_message(name: str, rejections: list[Verdict]) -> str:
    head = (f"PDDeployment {name!r} is rejected by {len(rejections)} compatibility "
            f"rule{'s' if len(rejections) != 1 else ''} "
            f"({', '.join(v.rule for v in rejections)}):")
    return "\n".join([head] + [f"  {i}. {format_verdict(v)}" for i, v in
                               enumerate(rejections, 1)])


def _warning(v: Verdict) -> str:
    text = f"{v.rule}: {v.message} (fix: {v.fix})"
    if v.policy_note:
        text += f" [{v.policy_note}]"
    return text if len(text) <= MAX_WARNING_LEN else text[: MAX_WARNING_LEN - 3] + "..."


def forbidden_policy(name: str, policy: str, forbidden: frozenset[str],
                     namespace_forbidden: frozenset[str] = frozenset(),
                     namespace: str = "") -> str | None:
    """The rejection message when `policy` is one the administrator forbids (cluster-wide by
    the operator flag, or by the namespace's label), else None."""
    if policy not in forbidden | namespace_forbidden:
        return None
    everything = forbidden | namespace_forbidden
    allowed = [p for p in POLICIES if p not in everything]
    if policy in forbidden:
        source = (f"operator flag --forbid-validation-policies="
                  f"{','.join(p for p in POLICIES if p in forbidden)}")
    else:
        names = ".".join(p for p in POLICIES if p in namespace_forbidden)
        source = f"label {FORBID_LABEL}={names} on namespace {namespace!r}"
    return (f"PDDeployment {name!r} is rejected by {FORBIDDEN_RULE}: spec.validation.policy is "
            f"{policy!r}, which this cluster's administrator forbids ({source}); "
            f"fields: spec.validation.policy; fix: set spec.validation.policy to "
            f"{' or '.join(repr(p) for p in allowed)} (or remove it: the default is 'Strict')")


def update_check_policy(old: PDDeploymentSpec | None, new: PDDeploymentSpec) -> str:
    """The policy the one-pool update check runs under: the stricter of the old and the new
    one, so that an update cannot switch the check off and change one pool at once."""
    if old is None:
        return new.validation.policy
    return min(old.validation.policy, new.validation.policy, key=POLICIES.index)


def validate(request: dict[str, Any], forbidden: frozenset[str] = frozenset(),
             namespace_forbidden: frozenset[str] = frozenset()) -> Outcome:
    """The validating webhook's decision for one AdmissionRequest; `forbidden` holds the
    validation policies the administrator forbids cluster-wide, `namespace_forbidden` those the
    request's namespace forbids by its label."""
    op = request.get("operation")
    if op not in ("CREATE", "UPDATE"):
        return Outcome(True)
    obj = request.get("object") or {}
    if not isinstance(obj, dict) or not isinstance(obj.get("metadata") or {}, dict):
        return Outcome(False, "request.object is not a PDDeployment object", code=400)
    name = (obj.get("metadata") or {}).get("name") or request.get("name") or "(unnamed)"
    if too_many_nodes(obj.get("spec")) or too_many_nodes(
            (request.get("oldObject") or {}).get("spec")
            if isinstance(request.get("oldObject"), dict) else None):
        return Outcome(False, f"PDDeployment {name!r}: the spec holds more than "
                       f"{REVIEW_MAX_NODES} values; no valid spec is that large", code=422)
    if op == "CREATE" and isinstance(name, str) and (err := name_error(name)):
        return Outcome(False, f"PDDeployment {name!r} cannot be rendered: {err}", code=422)
    try:
        spec = parse_spec(obj.get("spec"))
    except SpecError as exc:
        shown = exc.problems[:MAX_PROBLEMS_SHOWN]
        lines = [f"  - {p}: {m}" for p, m in shown]
        if len(exc.problems) > len(shown):
            lines.append(f"  - ... and {len(exc.problems) - len(shown)} more")
        return Outcome(False, f"PDDeployment {name!r} does not match the schema:\n"
                       + "\n".join(lines), code=422)
    old_spec = _old_spec(request) if op == "UPDATE" else None
    if old_spec is not None and old_spec == spec:
        return Outcome(True)  # metadata-only update (labels, annotations): nothing to judge
    if isinstance(name, str) and (
            refused := forbidden_policy(name, spec.validation.policy, forbidden,
                                        namespace_forbidden, str(request.get("namespace")))):
        return Outcome(False, refused, verdicts=[Verdict(
            FORBIDDEN_RULE, "reject", ["spec.validation.policy"], refused,
            "use a policy the administrator allows")])
    decision: Decision = decide_spec(spec)
    verdicts = list(decision.verdicts)
    update_policy = update_check_policy(old_spec, spec)
    if op == "UPDATE" and update_policy != "Disabled":
        update_verdict = _one_pool_update(old_spec, spec) if old_spec else None
        if update_verdict is not None:
            if update_policy == "Warn":
                update_verdict = Verdict(
                    update_verdict.rule, "warn", update_verdict.fields, update_verdict.message,
                    update_verdict.fix, update_verdict.source,
                    policy_note="would reject under policy Strict")
            verdicts.append(update_verdict)
    rejections = [v for v in verdicts if v.severity == "reject"]
    warnings = [_warning(v) for v in verdicts if v.severity != "reject"][:MAX_WARNINGS]
    if spec.validation.policy == "Disabled":
        warnings.insert(0, DISABLED_WARNING)
    if rejections:
        return Outcome(False, rejection_message(name, rejections), warnings, verdicts)
    return Outcome(True, "", warnings, verdicts)


def _old_spec(request: dict[str, Any]) -> PDDeploymentSpec | None:
    old = request.get("oldObject") or {}
    if not isinstance(old, dict):
        return None
    try:
        return parse_spec(old.get("spec"))
    except SpecError:
        return None  # an unparseable old object cannot be compared; the new one is judged alone


# --------------------------------------------------------------------------------- mutation
def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def defaults_patch(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """JSONPatch ops that write the resolved defaults into `spec` (a raw dict); [] when none
    are missing or the spec does not parse (the validating webhook reports that)."""
    try:
        parsed = parse_spec(spec)
    except SpecError:
        return []
    ops: list[dict[str, Any]] = []

    def add(path: str, value: Any) -> None:
        ops.append({"op": "add", "path": path, "value": value})

    engine = spec.get("engine") or {}
    if not engine.get("version"):
        version = version_from_image(parsed.engine.image)
        if version:
            add("/spec/engine/version", version)
    kv = spec.get("kvTransfer")
    if kv is None:
        add("/spec/kvTransfer", {"sideChannelPort": parsed.kv_transfer.side_channel_port})
    elif "sideChannelPort" not in kv:
        add("/spec/kvTransfer/sideChannelPort", parsed.kv_transfer.side_channel_port)
    validation = spec.get("validation")
    if validation is None:
        add("/spec/validation", {"policy": parsed.validation.policy})
    elif "policy" not in validation:
        add("/spec/validation/policy", parsed.validation.policy)
    for role in ("prefill", "decode"):
        pool = spec.get(role) or {}
        if not pool.get("kvCacheLayout"):
            add(f"/spec/{role}/kvCacheLayout", DEFAULT_LAYOUT)
        over = pool.get("engine") or {}
        if over.get("image") and not over.get("version"):
            version = version_from_image(over["image"])
            if version:
                add(f"/spec/{role}/engine/version", version)
    return ops


def mutate(request: dict[str, Any]) -> Outcome:
    if request.get("operation") not in ("CREATE", "UPDATE"):
        return Outcome(True)
    obj = request.get("object")
    spec = obj.get("spec") if isinstance(obj, dict) else None
    if not isinstance(spec, dict) or too_many_nodes(spec):
        return Outcome(True)  # nothing to default; validation refuses what is not a spec
    return Outcome(True, patch=defaults_patch(spec))


# --------------------------------------------------------------------------------- envelope
def response(review: dict[str, Any], outcome: Outcome) -> dict[str, Any]:
    """Wrap an Outcome as an AdmissionReview v1 response."""
    uid = (review.get("request") or {}).get("uid", "")
    resp: dict[str, Any] = {"uid": uid, "allowed": outcome.allowed}
    if not outcome.allowed:
        resp["status"] = {"code": outcome.code, "message": outcome.message,
                          "reason": "Invalid" if outcome.code == 422 else "Forbidden"}
    if outcome.warnings:
        resp["warnings"] = outcome.warnings
    if outcome.patch:
        resp["patchType"] = "JSONPatch"
        resp["patch"] = base64.b64encode(json.dumps(outcome.patch).encode()).decode()
    return {"apiVersion": review.get("apiVersion", "admission.k8s.io/v1"),
            "kind": "AdmissionReview", "response": resp}


def review_validate(review: dict[str, Any], forbidden: frozenset[str] = frozenset(),
                    namespace_forbidden: frozenset[str] = frozenset(),
                    ) -> tuple[dict[str, Any], Outcome]:
    outcome = validate(review.get("request") or {}, forbidden, namespace_forbidden)
    return response(review, outcome), outcome


def review_mutate(review: dict[str, Any]) -> tuple[dict[str, Any], Outcome]:
    outcome = mutate(review.get("request") or {})
    return response(review, outcome), outcome
