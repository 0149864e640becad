"""A failed reconcile is visible: Degraded condition, a Warning Event naming the child and the
API server's message, a retry delay that backs off, log lines naming the object (issue 11)."""

from __future__ import annotations

import asyncio
import logging

import kopf
import pytest
from op_fixtures import BASE

from pd_operator import handlers, kube, status

BODY = {"apiVersion": handlers.API_VERSION, "kind": "PDDeployment",
        "metadata": {"name": "demo", "namespace": "ns1", "uid": "u1", "generation": 2},
        "spec": BASE["spec"]}
REFUSAL = ('StatefulSet.apps "demo-prefill" is invalid: spec.template.spec.containers[0]'
           '.resources.limits: Invalid value: "abc": must be a quantity')


class FakeClient:
    """Applies everything except the children in `refuse` (kind, name) -> ApiError 422."""

    def __init__(self, refuse: set[tuple[str, str]]):
        self.refuse = refuse
        self.statuses: list[dict] = []

    async def apply(self, obj, *, force=True, dry_run=False):
        if (obj["kind"], obj["metadata"]["name"]) in self.refuse:
            raise kube.ApiError(422, {"message": REFUSAL, "reason": "Invalid"})
        return obj

    async def patch_merge(self, api_version, kind, namespace, name, patch, subresource=None):
        self.statuses.append(patch["status"])
        return patch


@pytest.fixture
def events(monkeypatch):
    posted: list[dict] = []
    monkeypatch.setattr(kopf, "event", lambda owner, **kw: posted.append(kw))
    return posted


@pytest.fixture
def client(monkeypatch):
    fake = FakeClient({("StatefulSet", "demo-prefill")})
    monkeypatch.setattr(handlers.RUNTIME, "client", fake)
    monkeypatch.setattr(handlers.RUNTIME, "owned", {})
    return fake


def _conds(st):
    return {c["type"]: c for c in st["conditions"]}


def test_retry_delay_backs_off_to_a_ceiling():
    delays = [handlers.retry_delay(n) for n in range(12)]
    assert delays[0] == handlers.RETRY_FIRST_S
    assert all(b >= a for a, b in zip(delays, delays[1:], strict=False))
    assert delays[3] > 4 * delays[0]
    assert max(delays) == handlers.RETRY_MAX_S == handlers.retry_delay(10_000)


def test_describe_failures_names_children_and_caps_the_list():
    fails = [({"kind": "Service", "metadata": {"name": f"s{i}"}},
              kube.ApiError(403, {"message": "forbidden"})) for i in range(5)]
    text = handlers.describe_failures(fails)
    assert text.startswith("Service s0: HTTP 403: forbidden; Service s1")
    assert "s3" not in text and text.endswith("and 2 more")
    other = handlers.describe_failures([({"kind": "ConfigMap", "metadata": {"name": "c"}},
                                         ConnectionResetError("peer"))])
    assert other == "ConfigMap c: ConnectionResetError: peer"


def test_refused_child_is_degraded_with_event_and_backoff(client, events, caplog):
    caplog.set_level(logging.INFO)
    with pytest.raises(kopf.TemporaryError) as err:
        asyncio.run(handlers.reconcile(kopf.Body(BODY), logging.getLogger("t"), retry=3))
    assert err.value.delay == handlers.retry_delay(3) > handlers.RETRY_FIRST_S
    assert "ns1/demo" in str(err.value) and "StatefulSet demo-prefill" in str(err.value)
    st = client.statuses[-1]
    deg = _conds(st)["Degraded"]
    assert st["phase"] == "Degraded"
    assert deg["status"] == "True" and deg["reason"] == "ApplyFailed"
    assert deg["message"] == f"StatefulSet demo-prefill: HTTP 422: {REFUSAL}"
    warn = [e for e in events if e["type"] == "Warning" and e["reason"] == "ApplyFailed"]
    assert len(warn) == 1 and "demo-prefill" in warn[0]["message"]
    assert "must be a quantity" in warn[0]["message"]

    # the same failure again: no new status write, no new Event
    n_status, n_events = len(client.statuses), len(events)
    with pytest.raises(kopf.TemporaryError):
        asyncio.run(handlers.reconcile(kopf.Body(BODY), logging.getLogger("t"), retry=4))
    assert (len(client.statuses), len(events)) == (n_status, n_events)

    # fixed: Degraded goes False, with a Normal Event
    client.refuse.clear()
    asyncio.run(handlers.reconcile(kopf.Body(BODY), logging.getLogger("t"), retry=5))
    deg = _conds(client.statuses[-1])["Degraded"]
    assert deg["status"] == "False" and client.statuses[-1]["phase"] != "Degraded"
    assert events[-1]["type"] == "Normal" and events[-1]["reason"] == "DegradedFalse"
    assert any("ns1/demo: applied" in r.getMessage() for r in caplog.records)


def test_renderer_crash_is_degraded_not_silent(client, events, monkeypatch, caplog):
    def boom(*_a, **_k):
        raise ValueError("bad quantity 'abc'")
    monkeypatch.setattr(handlers.render, "render", boom)
    caplog.set_level(logging.ERROR)
    with pytest.raises(kopf.PermanentError) as err:
        asyncio.run(handlers.reconcile(kopf.Body(BODY), logging.getLogger("t")))
    assert "ns1/demo" in str(err.value)
    deg = _conds(client.statuses[-1])["Degraded"]
    assert deg["reason"] == "RenderFailed" and "ValueError: bad quantity 'abc'" in deg["message"]
    assert any(e["reason"] == "RenderFailed" for e in events)
    assert any("ns1/demo" in r.getMessage() for r in caplog.records)


def test_status_degraded_condition_and_long_messages_truncated():
    failure = status.Failure("ApplyFailed", "x" * 5000)
    st, tr = status.compute(generation=1, desired={"prefill": 1, "decode": 1, "router": 1},
                            decision=None, observed=status.Observed(None, None, None),
                            previous=None, now="t", failure=failure)
    deg = _conds(st)["Degraded"]
    assert deg["status"] == "True" and len(deg["message"]) <= status.MAX_MESSAGE
    assert _conds(st)["Validated"]["status"] == "Unknown"
    assert "Degraded" in [t.type for t in tr if t.warning]
    again, tr2 = status.compute(generation=1, desired={"prefill": 1, "decode": 1, "router": 1},
                                decision=None, observed=status.Observed(None, None, None),
                                previous=st, now="t2",
                                failure=status.Failure("ApplyFailed", "another child"))
    assert [t.message for t in tr2] == ["another child"]  # a new failure is a new Event
    assert _conds(again)["Degraded"]["lastTransitionTime"] == "t"


def test_refused_drift_repair_is_degraded_too(client, events):
    client.refuse.clear()
    asyncio.run(handlers.reconcile(kopf.Body(BODY), logging.getLogger("t")))
    state = handlers.RUNTIME.owned[("ns1", "demo")]
    key, desired = next((k, c) for k, c in state.desired_children.items()
                        if c["kind"] == "ConfigMap")
    live = {**desired, "metadata": {**desired["metadata"], "ownerReferences": [
        {"apiVersion": handlers.API_VERSION, "kind": "PDDeployment", "name": "demo",
         "uid": "u1"}]}, "data": {"edited": "by hand"}}
    client.refuse.add(("ConfigMap", desired["metadata"]["name"]))
    with pytest.raises(kube.ApiError):
        asyncio.run(handlers._child_event(key[0], key[1], {"type": "MODIFIED", "object": live},
                                          logging.getLogger("t")))
    deg = _conds(client.statuses[-1])["Degraded"]
    assert deg["status"] == "True" and deg["message"].startswith(f"ConfigMap {key[2]}: HTTP 422")
    assert events[-1]["reason"] == "ApplyFailed"
