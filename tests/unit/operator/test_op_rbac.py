"""RBAC least privilege, derived (issue 11, item 7): run every handler path against a client
that records each API call, turn the calls into RBAC verbs (handlers.CLIENT_VERBS, resources
from kube.RESOURCES), add kopf's watches, and require handlers.RBAC_RULES to be exactly that.
tests/unit/test_chart.py then holds the chart's ClusterRole to RBAC_RULES."""

from __future__ import annotations

import asyncio
import copy
import logging

import kopf
import pytest
from op_fixtures import BASE

from pd_operator import handlers, kube, kvpath, kvpath_check
from pd_operator.api import v1alpha1 as api
from pd_operator.render import labels

BODY = {"apiVersion": handlers.API_VERSION, "kind": "PDDeployment",
        "metadata": {"name": "demo", "namespace": "ns1", "uid": "u1", "generation": 1},
        "spec": BASE["spec"]}


class RecordingClient:
    def __init__(self):
        self.grants: set[tuple[str, str, str]] = set()

    def _record(self, method, api_version, kind, subresource=None):
        plural, _ = kube.RESOURCES[(api_version, kind)]
        group = api_version.rpartition("/")[0]
        resource = plural + (f"/{subresource}" if subresource else "")
        self.grants |= {(group, resource, v) for v in handlers.CLIENT_VERBS[method]}

    async def apply(self, obj, **_):
        self._record("apply", obj["apiVersion"], obj["kind"])
        return obj

    async def create(self, obj, **_):
        self._record("create", obj["apiVersion"], obj["kind"])
        return obj

    async def get(self, api_version, kind, namespace, name):
        self._record("get", api_version, kind)
        if kind == "Secret":  # the side-channel token, read by the KV path check
            return {"data": {"token": "dG9rZW4="}}
        return copy.deepcopy(BODY)

    async def list(self, api_version, kind, namespace=None, label_selector=None):
        self._record("list", api_version, kind)
        return [{"metadata": {"name": "p-0", "uid": "p"}, "status": {
            "phase": "Running", "podIP": "10.0.0.1",
            "conditions": [{"type": "Ready", "status": "True"}]}}]

    async def patch_merge(self, api_version, kind, namespace, name, patch, subresource=None):
        self._record("patch_merge", api_version, kind, subresource)
        return patch


def _grants(rules):
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]}


@pytest.fixture
def recorder(monkeypatch):
    rec = RecordingClient()
    monkeypatch.setattr(handlers.RUNTIME, "client", rec)
    monkeypatch.setattr(handlers.RUNTIME, "owned", {})
    monkeypatch.setattr(kopf, "event", lambda *a, **k: rec.grants.add(("", "events", "create")))
    return rec


def test_rbac_rules_are_exactly_the_calls_the_handlers_make(recorder, monkeypatch):
    log = logging.getLogger("t")
    # a builtin pair too: its side-channel token Secret is created once (create only)
    builtin = copy.deepcopy(BODY)
    builtin["metadata"].update(name="demo-builtin", uid="u2")
    builtin["spec"]["engine"] = {"type": "builtin",
                                 "image": "ghcr.io/pd-operator/pd-runtime:0.1.0"}
    asyncio.run(handlers.reconcile(kopf.Body(builtin), log))
    assert ("", "secrets", "create") in recorder.grants
    # its KV path check once both pools are ready: list the pools' pods, read the token
    kv_state = handlers.RUNTIME.owned[("ns1", "demo-builtin")]
    for sts in (c for c in kv_state.desired_children.values() if c["kind"] == "StatefulSet"):
        n = sts["spec"]["replicas"]
        handlers._observe(kv_state, {**sts, "status": {"readyReplicas": n, "updatedReplicas": n}})

    async def no_network(*_a, **_k):
        return kvpath.Outcome(True, "Verified", "", 1, 0.001)

    monkeypatch.setattr(kvpath_check, "check", no_network)
    owner = labels.Owner("demo-builtin", "ns1", "u2")
    out = asyncio.run(handlers._check_once(recorder, owner, kv_state, 0))
    assert out is not None and out.ok
    assert {("", "pods", "list"), ("", "secrets", "get")} <= recorder.grants
    asyncio.run(handlers.reconcile(kopf.Body(copy.deepcopy(BODY)), log))
    state = handlers.RUNTIME.owned[("ns1", "demo")]
    for key, child in state.desired_children.items():
        live = copy.deepcopy(child)
        live["metadata"]["ownerReferences"] = [{"apiVersion": handlers.API_VERSION,
                                                "kind": api.KIND, "name": "demo", "uid": "u1"}]
        drifted = copy.deepcopy(live)
        drifted["metadata"]["labels"]["app.kubernetes.io/instance"] = "edited"
        for etype, obj in (("DELETED", live), ("MODIFIED", drifted)):
            asyncio.run(handlers._child_event(key[0], key[1], {"type": etype, "object": obj},
                                              log))
    derived = set(recorder.grants)
    # kopf: list + watch of every resource it handles; patches of PDDeployments (annotations)
    # and of their status subresource (its progress record)
    watched = [(api.GROUP, api.PLURAL)] + [(g, p) for g, _, p, _, _ in handlers.CHILD_KINDS]
    derived |= {(g, r, v) for g, r in watched for v in handlers.WATCH_VERBS}
    derived |= {(api.GROUP, api.PLURAL, "patch"), (api.GROUP, f"{api.PLURAL}/status", "patch")}
    declared = {t for t in _grants(handlers.RBAC_RULES) if t[1] != "leases"}  # leader.py
    assert derived == declared, (f"granted, never used: {sorted(declared - derived)}; "
                                 f"used, not granted: {sorted(derived - declared)}")
    assert not {v for _, _, v in declared} & {"update", "delete", "*", "escalate", "bind"}


def test_router_discovery_is_scoped_to_its_namespace():
    from pd_operator.render import Owner, render
    from pd_operator.validate import parse_spec, validate_spec

    children = render(Owner("demo", "ns1", "u"), validate_spec(parse_spec(BASE["spec"]))).children
    kinds = {c["kind"] for c in children}
    assert "ClusterRole" not in kinds and "ClusterRoleBinding" not in kinds
    role = next(c for c in children if c["kind"] == "Role")
    assert role["metadata"]["namespace"] == "ns1"
    cmd = next(c for c in children if c["kind"] == "Deployment"
               )["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[cmd.index("--service-discovery-namespace") + 1] == "ns1"
