"""status.py: conditions, phase and transitions from observed children (pure)."""

from __future__ import annotations

from op_fixtures import BASE, obj

from pd_operator import status
from pd_operator.render import Owner, render
from pd_operator.validate import parse_spec, validate_spec

DESIRED = {"prefill": 1, "decode": 2, "router": 1}


def _decision(o=BASE):
    return render(Owner("demo", "ns", "u"), validate_spec(parse_spec(o["spec"]))).decision


def _sts(replicas, ready, gen=1, observed=1, updated=None, current=None):
    return {"metadata": {"generation": gen}, "spec": {"replicas": replicas},
            "status": {"observedGeneration": observed, "readyReplicas": ready,
                       "replicas": replicas if current is None else current,
                       "updatedReplicas": replicas if updated is None else updated}}


def _conds(st):
    return {c["type"]: c for c in st["conditions"]}


def _compute(obs, previous=None, decision=None, now="t1", generation=1):
    return status.compute(generation=generation, desired=DESIRED,
                          decision=decision or _decision(), observed=obs,
                          previous=previous, now=now)


def test_nothing_yet_is_pending():
    st, tr = _compute(status.Observed(None, None, None))
    c = _conds(st)
    assert st["phase"] == "Pending"
    assert c["Validated"]["status"] == "True" and c["Validated"]["reason"] == "Accepted"
    assert c["PrefillReady"]["reason"] == "NotFound"
    assert c["Ready"]["status"] == "False"
    assert [t.type for t in tr] == ["Validated"]
    assert st["observedGeneration"] == 1
    assert st["compatibility"]["prefillHash"] == st["compatibility"]["decodeHash"]


def test_all_ready_then_lost_is_degraded_with_events():
    obs = status.Observed(_sts(1, 1), _sts(2, 2), _sts(1, 1))
    first, _ = _compute(status.Observed(None, None, None))
    ready, tr = _compute(obs, previous=first, now="t2")
    assert ready["phase"] == "Ready"
    assert ready["prefill"] == {"replicas": 1, "readyReplicas": 1}
    assert ready["decode"] == {"replicas": 2, "readyReplicas": 2}
    assert {t.type for t in tr} == {"PrefillReady", "DecodeReady", "RouterReady", "Ready"}
    assert all(not t.warning for t in tr)
    c = _conds(ready)
    assert c["Validated"]["lastTransitionTime"] == "t1"  # unchanged status keeps its time
    assert c["Ready"]["lastTransitionTime"] == "t2"
    lost, tr = _compute(status.Observed(_sts(1, 1), _sts(2, 1), _sts(1, 1)), previous=ready,
                        now="t3")
    assert lost["phase"] == "Degraded"
    assert {t.type for t in tr} == {"DecodeReady", "Ready"} and all(t.warning for t in tr)
    assert _conds(lost)["DecodeReady"]["message"] == "1/2 pods ready"


def test_scaling_and_rollout_are_progressing():
    st, _ = _compute(status.Observed(_sts(1, 1), _sts(1, 1), _sts(1, 1)))
    assert _conds(st)["DecodeReady"]["reason"] == "Scaling"
    assert st["phase"] == "Progressing"
    st, _ = _compute(status.Observed(_sts(1, 1), _sts(2, 2, updated=1), _sts(1, 1)))
    assert _conds(st)["DecodeReady"]["reason"] == "RollingUpdate"
    st, _ = _compute(status.Observed(_sts(1, 1, gen=2, observed=1), _sts(2, 2), _sts(1, 1)))
    assert _conds(st)["PrefillReady"]["reason"] == "Progressing"


def test_scale_down_is_not_ready_while_the_extra_pods_exist():
    # the StatefulSet has seen the new spec (2 -> 1) but a second ready pod still exists
    st, _ = _compute(status.Observed(_sts(1, 2, current=2), _sts(2, 2), _sts(1, 1)))
    c = _conds(st)["PrefillReady"]
    assert (c["status"], c["reason"], c["message"]) == ("False", "Scaling", "2 pods, 1 wanted")
    assert st["phase"] == "Progressing" and st["prefill"] == {"replicas": 1, "readyReplicas": 2}
    st, _ = _compute(status.Observed(_sts(1, 1), _sts(2, 2), _sts(1, 1)))
    assert st["phase"] == "Ready"


def test_rejected_decision_is_degraded_and_lists_verdicts():
    bad = obj(prefill__tensorParallelSize=3)
    st, tr = _compute(status.Observed(None, None, None), decision=_decision(bad))
    assert st["phase"] == "Degraded"
    assert _conds(st)["Validated"]["reason"] == "Rejected"
    assert "TP-DIVISIBLE" in _conds(st)["Validated"]["message"]
    assert any(v["rule"] == "TP-DIVISIBLE" for v in st["compatibility"]["verdicts"])
    assert tr[0].warning


def test_same_ignores_timestamps_only():
    a, _ = _compute(status.Observed(None, None, None), now="t1")
    b, _ = _compute(status.Observed(None, None, None), now="t9")
    assert status.same(a, b)
    c, _ = _compute(status.Observed(_sts(1, 1), None, None))
    assert not status.same(a, c)


def test_status_verdict_is_the_compat_verdict_without_its_policy_note():
    """api.Verdict is the CRD's form of pd_runtime.compat.Verdict: the same keys, bar policyNote
    (the status records the policy's outcome, not what another policy would have done)."""
    from pd_runtime.compat import Verdict

    v = Verdict("R", "warn", ["spec.x"], "m", "f", "s", policy_note="would reject")
    assert status.STATUS_VERDICT_KEYS == set(v.to_dict()) - {"policyNote"}
    warn = obj(prefill__tensorParallelSize=3, validation={"policy": "Warn"})
    st, _ = _compute(status.Observed(None, None, None), decision=_decision(warn))
    verdicts = st["compatibility"]["verdicts"]
    assert verdicts and all(set(x) == status.STATUS_VERDICT_KEYS for x in verdicts)
