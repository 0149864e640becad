"""PDDeployment status from what was observed (pure): children in, status and transitions out.

The status is built as the API's own status model (api.PDDeploymentStatus) and returned in its
JSON form, so it cannot drift from the CRD's schema.

Conditions (a list keyed by type): Validated, PrefillReady, DecodeReady, RouterReady,
KVPathVerified (a real pull between a prefill and a decode pod: kvpath.py), Ready, and
Degraded (True while the last reconcile failed: the child it failed on and the API server's
message, or the renderer's error). Ready needs every other readiness condition True, except a
KVPathVerified that is Unknown because no check applies (vLLM pools, verification off).
`lastTransitionTime` only moves when a condition's status changes. The handlers turn the
returned transitions into Kubernetes Events; a Degraded condition whose message changes, and a
KVPathVerified that fails for a new reason, are transitions too, so each new failure is an Event.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pd_runtime.compat import Decision

from . import kvpath
from .api import v1alpha1 as api

CONDITION_TYPES = ("Validated", "PrefillReady", "DecodeReady", "RouterReady", "KVPathVerified",
                   "Ready", "Degraded")
# Longest message kept in a condition or Event (the API server's messages can quote a whole
# object; the Event API caps messages at 1 KiB).
MAX_MESSAGE = 1000


@dataclass(frozen=True)
class Failure:
    """Why the last reconcile did not finish: `reason` is ApplyFailed or RenderFailed; the
    message names the child (kind and name) and carries the API server's own words."""

    reason: str
    message: str


@dataclass(frozen=True)
class Observed:
    """The children whose state decides readiness (None = not found)."""

    prefill: dict[str, Any] | None
    decode: dict[str, Any] | None
    router: dict[str, Any] | None


@dataclass(frozen=True)
class Transition:
    type: str
    status: str
    reason: str
    message: str
    warning: bool


def _workload(obj: dict[str, Any] | None, desired: int,
              kind: str) -> tuple[str, str, str, api.PoolStatus]:
    """(status, reason, message, pool status) of a StatefulSet or Deployment."""
    if obj is None:
        return ("False", "NotFound", f"the {kind} does not exist yet",
                api.PoolStatus(replicas=desired, ready_replicas=0))
    st = obj.get("status") or {}
    spec_replicas = (obj.get("spec") or {}).get("replicas", desired)
    ready = int(st.get("readyReplicas") or 0)
    updated = int(st.get("updatedReplicas") or 0)
    pool = api.PoolStatus(replicas=spec_replicas, ready_replicas=ready)
    generation = (obj.get("metadata") or {}).get("generation")
    if generation is not None and st.get("observedGeneration", 0) < generation:
        return "False", "Progressing", "the controller has not seen the latest spec yet", pool
    if spec_replicas != desired:
        return "False", "Scaling", f"{spec_replicas} replicas, {desired} wanted", pool
    current = int(st.get("replicas") or 0)
    if current > spec_replicas:  # a scale-down is not over while its extra pods still exist
        return "False", "Scaling", f"{current} pods, {spec_replicas} wanted", pool
    if updated < spec_replicas:
        return "False", "RollingUpdate", f"{updated}/{spec_replicas} pods updated", pool
    if ready < spec_replicas:
        return "False", "ReplicasNotReady", f"{ready}/{spec_replicas} pods ready", pool
    return "True", "AllReplicasReady", f"{ready}/{spec_replicas} pods ready", pool


POOL_CONDITIONS = ("PrefillReady", "DecodeReady")


def pools_ready(observed: Observed, desired: dict[str, int]) -> bool:
    """Both pools' StatefulSets are ready (what the KV path check waits for)."""
    return all(_workload(getattr(observed, k), desired.get(k, 0), "StatefulSet")[0] == "True"
               for k in ("prefill", "decode"))


DISABLED_MESSAGE = "validation.policy is Disabled: the pools were not checked"


def _validated(decision: Decision | None, spec_error: str | None,
               policy: str = "Strict") -> tuple[str, str, str]:
    if spec_error is not None:
        return "False", "InvalidSpec", spec_error
    if decision is None:  # validation itself failed (see the Degraded condition)
        return "Unknown", "NotEvaluated", "the compatibility rules could not be evaluated"
    if policy == "Disabled":  # no rule ran: an empty verdict list proves nothing (issue 11)
        return "Unknown", "ValidationDisabled", DISABLED_MESSAGE
    if not decision.accepted:
        ids = ", ".join(v.rule for v in decision.rejections)
        return "False", "Rejected", f"rejected by {ids}"
    if decision.warnings:
        ids = ", ".join(v.rule for v in decision.warnings)
        return "True", "AcceptedWithWarnings", f"warnings: {ids}"
    return "True", "Accepted", "the pools are compatible"


def compute(*, generation: int | None, desired: dict[str, int], decision: Decision | None,
            observed: Observed, previous: dict[str, Any] | None, now: str,
            spec_error: str | None = None, failure: Failure | None = None,
            policy: str = "Strict", kv_path: kvpath.KVPathState | None = None,
            ) -> tuple[dict[str, Any], list[Transition]]:
    """The full status and the condition transitions since `previous` (the stored status).

    `desired` has the wanted replicas of "prefill", "decode" and "router"; `failure` is the
    last reconcile's error (None when it succeeded); `policy` is the spec's validation.policy
    (under Disabled, Validated is Unknown: nothing was checked); `kv_path` is what the KV path
    check knows (None: no check applies, as for vLLM pools).
    """
    previous = previous or {}
    prev_conds = {c.get("type"): c for c in previous.get("conditions") or []}
    rows: list[tuple[str, str, str, str]] = []
    v_status, v_reason, v_msg = _validated(decision, spec_error, policy)
    rows.append(("Validated", v_status, v_reason, v_msg))
    pools: dict[str, api.PoolStatus] = {}
    for cond, key, kind in (("PrefillReady", "prefill", "StatefulSet"),
                            ("DecodeReady", "decode", "StatefulSet"),
                            ("RouterReady", "router", "Deployment")):
        s, r, m, pool = _workload(getattr(observed, key), desired[key], kind)
        pools[key] = pool
        rows.append((cond, s, r, m))
    pools_ready = all(s == "True" for t, s, _, _ in rows if t in POOL_CONDITIONS)
    rows.append(("KVPathVerified", *kvpath.condition(
        kv_path or kvpath.KVPathState(applies="unsupported"), pools_ready,
        prev_conds.get("KVPathVerified"))))
    not_ready = [t for t, s, r, _ in rows
                 if (kvpath.blocks_ready(s, r) if t == "KVPathVerified" else s != "True")]
    if not not_ready:
        rows.append(("Ready", "True", "AllComponentsReady", "prefill, decode and router ready"))
    else:
        rows.append(("Ready", "False", "ComponentsNotReady", f"not yet: {', '.join(not_ready)}"))
    if failure is not None:
        rows.append(("Degraded", "True", failure.reason, truncate(failure.message)))
    else:
        rows.append(("Degraded", "False", "Reconciled", "the last reconcile succeeded"))

    conditions: list[api.Condition] = []
    transitions: list[Transition] = []
    for ctype, cstatus, reason, message in rows:
        prev = prev_conds.get(ctype)
        changed = prev is None or prev.get("status") != cstatus
        keep_time = None if changed or prev is None else prev.get("lastTransitionTime")
        conditions.append(api.Condition.model_validate({
            "type": ctype, "status": cstatus, "reason": reason, "message": message,
            "lastTransitionTime": keep_time or now, "observedGeneration": generation}))
        bad = cstatus == "True" if ctype == "Degraded" else \
            kvpath.blocks_ready(cstatus, reason) if ctype == "KVPathVerified" else \
            cstatus != "True"
        new_failure = prev is not None and bad and (
            (ctype == "Degraded" and prev.get("message") != message)
            or (ctype == "KVPathVerified" and prev.get("reason") != reason
                and reason not in kvpath.QUIET))  # each new reason a check fails for
        if (changed and (prev is not None or cstatus == "True" or ctype == "Validated")) \
                or new_failure:
            transitions.append(Transition(ctype, cstatus, reason, message, warning=bad))

    ready = not not_ready
    # a Degraded phase that came from a reconcile failure ends with the failure
    failed_before = (prev_conds.get("Degraded") or {}).get("status") == "True"
    any_ready = any(p.ready_replicas > 0 for p in pools.values())
    if v_status != "True" or failure is not None:
        phase = "Degraded"
    elif ready:
        phase = "Ready"
    elif previous.get("phase") in ("Ready", "Degraded") and not failed_before and \
            previous.get("observedGeneration") == generation:
        phase = "Degraded"  # it was Ready for this generation and lost a component
    elif not any_ready:
        phase = "Pending"
    else:
        phase = "Progressing"

    status = api.PDDeploymentStatus.model_validate({
        "observedGeneration": generation, "phase": phase, "conditions": conditions,
        **pools, **({} if decision is None else {"compatibility": compatibility(decision)})})
    # exclude_unset: no compatibility block before a decision exists
    return status.model_dump(by_alias=True, exclude_unset=True), transitions


def compatibility(decision: Decision) -> api.CompatibilityStatus:
    """The decision as the status holds it (the verdicts without the policy note)."""
    verdicts = [{k: v for k, v in d.items() if k in STATUS_VERDICT_KEYS}
                for d in (x.to_dict() for x in decision.verdicts)]
    return api.CompatibilityStatus.model_validate({
        "prefillHash": decision.prefill_hash, "decodeHash": decision.decode_hash,
        "verdicts": verdicts})


# The keys of Verdict.to_dict() that the CRD's status Verdict has (not policyNote).
STATUS_VERDICT_KEYS = frozenset(api.Verdict.model_fields[n].alias or n
                                for n in api.Verdict.model_fields)


def truncate(message: str, limit: int = MAX_MESSAGE) -> str:
    tail = "... (truncated)"
    return message if len(message) <= limit else message[:limit - len(tail)] + tail


def same(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Equal ignoring condition timestamps (to skip no-op status patches)."""
    def strip(s: dict[str, Any] | None) -> Any:
        if not s:
            return s
        out = dict(s)
        out["conditions"] = [{k: v for k, v in c.items() if k != "lastTransitionTime"}
                             for c in s.get("conditions") or []]
        return out
    return strip(a) == strip(b)
