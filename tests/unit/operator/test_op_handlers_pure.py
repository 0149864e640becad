"""The pure helpers of handlers.py (drift detection) and leader.py (lease expiry)."""

from __future__ import annotations

import copy
import datetime

from op_fixtures import BASE

from pd_operator import handlers, leader
from pd_operator.render import Owner, render
from pd_operator.validate import parse_spec, validate_spec


def _children():
    return render(Owner("demo", "ns", "u"), validate_spec(parse_spec(BASE["spec"]))).children


def _server_defaults(obj):
    """What the API server adds: defaults and status, which are not drift."""
    live = copy.deepcopy(obj)
    live["metadata"]["resourceVersion"] = "7"
    live["metadata"]["labels"]["extra"] = "x"
    if live["kind"] == "StatefulSet":
        live["spec"]["revisionHistoryLimit"] = 10
        c = live["spec"]["template"]["spec"]["containers"][0]
        c["terminationMessagePath"] = "/dev/termination-log"
        c["readinessProbe"]["successThreshold"] = 1
        live["status"] = {"replicas": 1}
    if live["kind"] == "Service":
        live["spec"]["clusterIPs"] = ["None"]
        live["spec"]["sessionAffinity"] = "None"
    return live


def test_server_defaults_are_not_drift():
    for child in _children():
        assert not handlers.drifted(child, _server_defaults(child)), child["kind"]


def test_hand_edits_are_drift():
    kids = {(c["kind"], c["metadata"]["name"]): c for c in _children()}
    sts = _server_defaults(kids[("StatefulSet", "demo-decode")])
    sts["spec"]["replicas"] = 9
    assert handlers.drifted(kids[("StatefulSet", "demo-decode")], sts)
    cm = _server_defaults(kids[("ConfigMap", "demo-config")])
    cm["data"]["prefill.json"] = "{}"
    assert handlers.drifted(kids[("ConfigMap", "demo-config")], cm)
    role = _server_defaults(kids[("Role", "demo-router")])
    role["rules"][0]["verbs"] = ["*"]
    assert handlers.drifted(kids[("Role", "demo-router")], role)
    svc = _server_defaults(kids[("Service", "demo-router")])
    del svc["metadata"]["labels"]["app.kubernetes.io/component"]
    assert handlers.drifted(kids[("Service", "demo-router")], svc)


def test_rbac_rules_cover_every_child_kind():
    covered = {(g, r) for rule in handlers.RBAC_RULES for g in rule["apiGroups"]
               for r in rule["resources"] if "patch" in rule["verbs"]}
    for group, _, plural, _, _ in handlers.CHILD_KINDS:
        assert (group, plural) in covered


def _lease(holder, renew_age_s, duration=10):
    t = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=renew_age_s)
    return {"spec": {"holderIdentity": holder, "leaseDurationSeconds": duration,
                     "renewTime": leader._fmt(t)}}


def test_lease_expiry():
    e = leader.Elector(None, leader.LeaseConfig("l", "ns", "me", duration=10))
    assert not e._expired(_lease("other", 1))
    assert e._expired(_lease("other", 30))
    assert e._expired(_lease("", 1))
    assert leader._parse(leader._fmt(datetime.datetime(2026, 1, 2, 3, 4, 5, 6,
                                                       tzinfo=datetime.UTC))) \
        == datetime.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=datetime.UTC)


def test_no_handler_needs_a_finalizer():
    """Timers, daemons and on.delete make kopf add a finalizer, which blocks garbage
    collection (and namespace deletion) whenever the operator is not running."""
    import kopf

    reg = kopf.get_default_registry()
    assert list(reg._spawning.get_all_handlers()) == []
    reasons = {h.reason for h in reg._changing.get_all_handlers()}
    assert "delete" not in {str(r).lower() for r in reasons}
    assert all(not getattr(h, "requires_finalizer", False)
               for h in reg._changing.get_all_handlers())


def test_in_cluster_token_is_reread(tmp_path):
    from pd_operator import kube

    f = tmp_path / "token"
    f.write_text("one\n")
    creds = kube.Credentials("https://x", None, None, None, None, True, str(f))
    assert creds.current_token() == "one"
    f.write_text("two")
    assert creds.current_token() == "two"
    assert kube.Credentials("https://x", None, None, None, "static").current_token() == "static"
