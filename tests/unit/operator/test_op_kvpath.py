"""KVPathVerified: the pure core (kvpath.py: pod choice, answers, the condition), the status it
feeds (Ready waits for it on builtin pools only), the decode NetworkPolicy that lets the
operator in, and the handlers' check loop against a fake API server and a scripted check: a
failure is retried, a pass sets True, a replaced prefill pod makes it False then True again."""

from __future__ import annotations

import asyncio
import copy
import logging
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml
from op_fixtures import BASE

from pd_operator import handlers, kvpath, kvpath_check, status
from pd_operator.render import Owner, render
from pd_operator.render.network import OPERATOR_POD_LABELS
from pd_operator.validate import parse_spec, validate_spec

BUILTIN_IMAGE = "ghcr.io/pd-operator/pd-runtime:0.1.0"
ROOT = Path(__file__).resolve().parents[3]


def _pod(name: str, uid: str = "u", ip: str | None = "10.0.0.9", phase: str = "Running",
         ready: bool = True, restarts: int = 0, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "uid": uid}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    st: dict[str, Any] = {"phase": phase, "conditions": [
        {"type": "Ready", "status": "True" if ready else "False"}],
        "containerStatuses": [{"restartCount": restarts}]}
    if ip:
        st["podIP"] = ip
    return {"metadata": meta, "status": st}


# ------------------------------------------------------------------------------- pure core
def test_choose_takes_the_lowest_ready_pod_and_skips_the_rest():
    pods = [_pod("d-10", "a"), _pod("d-2", "b"), _pod("d-0", "c", ready=False),
            _pod("d-1", "d", ip=None), _pod("d-3", "e", deleting=True),
            _pod("d-4", "f", phase="Pending")]
    chosen = kvpath.choose(pods)
    assert chosen is not None and chosen.name == "d-2"  # ordinal order, not string order
    assert kvpath.choose([_pod("x", ready=False)]) is None


def test_a_pod_key_changes_when_replaced_or_restarted():
    a = kvpath.ready_pod(_pod("p-0", "uid1"))
    assert a is not None
    for other in (_pod("p-0", "uid2"), _pod("p-0", "uid1", restarts=1),
                  _pod("p-0", "uid1", ip="10.0.0.10")):
        b = kvpath.ready_pod(other)
        assert b is not None and b.key != a.key


@pytest.mark.parametrize("http, body, ok, reason", [
    (200, {"version": 1, "ok": True, "bytes": 4 << 20, "seconds": 0.0031}, True, "Verified"),
    (200, {"ok": False, "error": {"code": "PatternMismatch", "message": "1 of 4 bytes"}},
     False, "PatternMismatch"),
    (403, {"ok": False, "error": {"code": "Forbidden", "message": "x"}}, False, "Forbidden"),
    (502, "<html>bad gateway</html>", False, "BadAnswer"),
    (200, {"ok": True}, False, "BadAnswer"),
    (500, {"ok": False, "error": {"code": "weird code!", "message": ""}}, False, "Weirdcode"),
    (500, {"ok": False}, False, "HTTP500"),
])
def test_answers_become_named_outcomes(http, body, ok, reason):
    out = kvpath.parse_answer(http, body)
    assert out.ok is ok and out.reason == reason


PAIR = kvpath.Pair(kvpath.PodRef("demo-prefill-0", "p", "10.0.0.1", 0),
                   kvpath.PodRef("demo-decode-0", "d", "10.0.0.2", 0))


def test_the_condition_table():
    cond = kvpath.condition
    assert cond(kvpath.KVPathState("disabled"), True)[:2] == ("Unknown", kvpath.DISABLED)
    assert cond(kvpath.KVPathState("unsupported"), True)[:2] == ("Unknown", kvpath.UNSUPPORTED)
    assert cond(kvpath.KVPathState(), False)[:2] == ("False", kvpath.WAITING)
    assert cond(kvpath.KVPathState(pair=PAIR), True)[:2] == ("False", kvpath.VERIFYING)
    ok = kvpath.Outcome(True, "Verified", "", 4 << 20, 0.0031)
    assert cond(kvpath.KVPathState(pair=PAIR, outcome=ok), True) == (
        "True", "Verified", "pulled 4.0 MiB from demo-prefill-0 to demo-decode-0 in 3.1 ms")
    timed = kvpath.parse_answer(200, {"ok": True, "bytes": 4 << 20, "seconds": 0.0952,
                                      "read_seconds": 0.0021})
    assert cond(kvpath.KVPathState(pair=PAIR, outcome=timed), True)[2].endswith(
        "in 95.2 ms (the READ: 2.1 ms)")
    bad = kvpath.Outcome(False, "PullFailed", "READ failed")
    s, r, m = cond(kvpath.KVPathState(pair=PAIR, outcome=bad, retry_in_s=20), True)
    assert (s, r) == ("False", "PullFailed")
    assert m == ("KV pull from demo-prefill-0 to demo-decode-0 failed: READ failed; "
                 "next check in 20s")
    # an outcome is only shown while the pools are ready
    assert cond(kvpath.KVPathState(pair=PAIR, outcome=ok), False)[1] == kvpath.WAITING


def test_one_check_per_prefill_rank_from_the_same_decode_pod():
    """Rank r of a builtin prefill pod listens on the base port + r (the runtime's
    make_prefill_side; tests/runtime/test_kv_path_check.py checks it against a TP 2 server)."""
    (one,) = kvpath.plan(PAIR, 8000, (5600,))
    assert one == kvpath.RankCheck(0, "10.0.0.2:8000", "10.0.0.1:5600")
    two = kvpath.plan(PAIR, 8000, (5600, 5601))
    assert [(c.rank, c.decode, c.prefill) for c in two] == [
        (0, "10.0.0.2:8000", "10.0.0.1:5600"), (1, "10.0.0.2:8000", "10.0.0.1:5601")]
    v6 = kvpath.Pair(kvpath.PodRef("p-0", "p", "fd00::1", 0),
                     kvpath.PodRef("d-0", "d", "fd00::2", 0))
    assert [c.prefill for c in kvpath.plan(v6, 8000, (5600, 5601))] == [
        "[fd00::1]:5600", "[fd00::1]:5601"]
    # the rendered pool gives the ports: base from kvTransfer.sideChannelPort, one per TP rank
    spec = _builtin_spec()
    for tp, ports in ((1, (5600,)), (2, (5600, 5601)), (4, (5600, 5601, 5602, 5603))):
        spec["prefill"]["tensorParallelSize"] = tp
        pool = render(Owner("demo", "ns", "u"), validate_spec(parse_spec(spec))).prefill
        assert kvpath_check.prefill_ports(pool) == ports
        # the pod declares the same listeners (side-r), and its NetworkPolicy admits them
        rendered = render(Owner("demo", "ns", "u"), validate_spec(parse_spec(spec)))
        sts = next(o for o in rendered.children if o["kind"] == "StatefulSet"
                   and o["metadata"]["name"].endswith("prefill"))
        declared = {p["name"]: p["containerPort"]
                    for p in sts["spec"]["template"]["spec"]["containers"][0]["ports"]}
        assert [declared[f"side-{r}"] for r in range(tp)] == list(ports), declared


def _ok(ms: float, read_ms: float = 0.0) -> kvpath.Outcome:
    return kvpath.Outcome(True, "Verified", "", 4 << 20, ms / 1e3, read_ms / 1e3)


def test_tp1_prefill_the_condition_says_what_it_said_before():
    cond = kvpath.condition
    ok = kvpath.combine([_ok(3.1)], 1)
    assert ok.ok and ok.ranks == 1
    assert cond(kvpath.KVPathState(pair=PAIR, outcome=ok), True) == (
        "True", "Verified", "pulled 4.0 MiB from demo-prefill-0 to demo-decode-0 in 3.1 ms")
    bad = kvpath.combine([kvpath.Outcome(False, "Unreachable", "connection refused")], 1)
    assert (bad.ok, bad.reason, bad.rank) == (False, "Unreachable", 0)
    assert cond(kvpath.KVPathState(pair=PAIR, outcome=bad, retry_in_s=5), True) == (
        "False", "Unreachable", "KV pull from demo-prefill-0 to demo-decode-0 failed: "
                                "connection refused; next check in 5s")


def test_tp2_prefill_verified_only_when_every_rank_passed():
    cond = kvpath.condition
    ok = kvpath.combine([_ok(3.1, 1.0), _ok(2.0, 1.5)], 2)
    assert ok.ok and ok.ranks == 2 and ok.bytes == 4 << 20
    assert cond(kvpath.KVPathState(pair=PAIR, outcome=ok), True) == (
        "True", "Verified", "pulled 4.0 MiB from each of 2 ranks of demo-prefill-0 to "
                            "demo-decode-0 in 3.1 ms max (the READ: 1.5 ms max)")
    # rank 1 fails: False, its reason code unchanged, the rank named
    rank1 = kvpath.combine([_ok(3.1), kvpath.Outcome(False, "PullFailed", "READ failed")], 2)
    assert (rank1.ok, rank1.reason, rank1.rank, rank1.ranks) == (False, "PullFailed", 1, 2)
    assert cond(kvpath.KVPathState(pair=PAIR, outcome=rank1, retry_in_s=20), True) == (
        "False", "PullFailed", "KV pull from rank 1 of demo-prefill-0 (TP 2) to demo-decode-0 "
                               "failed: READ failed; next check in 20s")
    rank0 = kvpath.combine([kvpath.Outcome(False, "Unreachable", "refused")], 2)
    assert (rank0.reason, rank0.rank) == ("Unreachable", 0)
    assert "from rank 0 of demo-prefill-0 (TP 2)" in cond(
        kvpath.KVPathState(pair=PAIR, outcome=rank0), True)[2]
    # a rank that never answered is not a pass
    short = kvpath.combine([_ok(3.1)], 2)
    assert not short.ok and short.rank == 1
    assert not kvpath.combine([], 2).ok
    # a failure of no rank (the token): the pod named, not a rank
    token = kvpath.Outcome(False, kvpath_check.TOKEN_UNAVAILABLE, "Secret x does not exist",
                           ranks=2)
    assert cond(kvpath.KVPathState(pair=PAIR, outcome=token), True)[2].startswith(
        "KV pull from demo-prefill-0 to demo-decode-0 failed: Secret x does not exist")


def test_the_shell_checks_the_ranks_in_turn_stops_at_a_failure_and_is_bounded(monkeypatch):
    checks = kvpath.plan(PAIR, 8000, (5600, 5601, 5602))
    calls = _script(monkeypatch, [_ok(1), kvpath.Outcome(False, "PatternMismatch", "1 byte")])
    out = asyncio.run(kvpath_check.check_ranks(checks, "t"))
    assert (out.ok, out.reason, out.rank, out.ranks) == (False, "PatternMismatch", 1, 3)
    assert [c[1] for c in calls] == ["10.0.0.1:5600", "10.0.0.1:5601"]  # rank 2 not tried
    calls = _script(monkeypatch, [_ok(1)] * 3)
    out = asyncio.run(kvpath_check.check_ranks(checks, "t"))
    assert out.ok and out.ranks == 3 and len(calls) == 3

    # the checks of all ranks share one deadline: each call gets what is left of it
    budgets: list[float] = []

    async def slow(decode, prefill, token, *, call_timeout_s, **_):
        budgets.append(call_timeout_s)
        await asyncio.sleep(0.3)
        return _ok(1)

    monkeypatch.setattr(kvpath_check, "check", slow)
    out = asyncio.run(kvpath_check.check_ranks(checks, "t", total_timeout_s=0.2))
    assert (out.ok, out.reason, out.rank) == (False, kvpath_check.DECODE_TIMEOUT, 1)
    assert len(budgets) == 1 and budgets[0] <= 0.2


def test_retry_delay_doubles_to_five_minutes():
    assert [kvpath.retry_delay(i) for i in range(4)] == [5, 10, 20, 40]
    assert kvpath.retry_delay(30) == 300


def test_the_operator_address_of_an_ipv6_pod():
    assert kvpath.address("fd00::5", 8000) == "[fd00::5]:8000"
    assert kvpath.address("10.0.0.5", 5600) == "10.0.0.5:5600"


# ---------------------------------------------------------------------------------- status
def _sts(n: int, ready: int) -> dict[str, Any]:
    return {"metadata": {"generation": 1}, "spec": {"replicas": n},
            "status": {"observedGeneration": 1, "readyReplicas": ready, "updatedReplicas": n}}


def _decision():
    return render(Owner("demo", "ns", "u"), validate_spec(parse_spec(BASE["spec"]))).decision


ALL_READY = status.Observed(_sts(1, 1), _sts(1, 1), _sts(1, 1))
DESIRED = {"prefill": 1, "decode": 1, "router": 1}


def _status(kv: kvpath.KVPathState | None, observed=ALL_READY, previous=None):
    return status.compute(generation=1, desired=DESIRED, decision=_decision(),
                          observed=observed, previous=previous, now="t", kv_path=kv)


def _cond(st: dict[str, Any], t: str = "KVPathVerified") -> dict[str, Any]:
    return next(c for c in st["conditions"] if c["type"] == t)


def test_ready_waits_for_the_kv_path_on_builtin_pools_only():
    assert "KVPathVerified" in status.CONDITION_TYPES
    st, _ = _status(kvpath.KVPathState(pair=PAIR))
    assert st["phase"] == "Progressing" and _cond(st, "Ready")["status"] == "False"
    assert "KVPathVerified" in _cond(st, "Ready")["message"]
    ok = kvpath.Outcome(True, "Verified", "", 1 << 20, 0.002)
    st, tr = _status(kvpath.KVPathState(pair=PAIR, outcome=ok), previous=st)
    assert st["phase"] == "Ready" and _cond(st)["status"] == "True"
    assert ("KVPathVerified", "True") in {(t.type, t.status) for t in tr}
    for applies in ("unsupported", "disabled"):  # Unknown, and Ready all the same
        st, _ = _status(kvpath.KVPathState(applies))
        assert st["phase"] == "Ready" and _cond(st)["status"] == "Unknown"
    st, _ = _status(None)  # no check applies (vLLM)
    assert _cond(st)["reason"] == kvpath.UNSUPPORTED and st["phase"] == "Ready"


def test_an_operator_restart_does_not_drop_a_verified_path_while_it_checks_again():
    ok = kvpath.Outcome(True, "Verified", "", 1 << 20, 0.002)
    verified, _ = _status(kvpath.KVPathState(pair=PAIR, outcome=ok))
    # a new process: nothing known yet, the stored status says Verified
    again, tr = _status(kvpath.KVPathState(pair=PAIR), previous=verified)
    assert _cond(again)["status"] == "True" and again["phase"] == "Ready" and not tr
    assert _cond(again)["message"] == _cond(verified)["message"]
    bad = kvpath.Outcome(False, "PullFailed", "READ failed")
    failed, tr = _status(kvpath.KVPathState(pair=PAIR, outcome=bad), previous=again)
    assert _cond(failed)["status"] == "False" and [t.type for t in tr if t.warning] == [
        "KVPathVerified", "Ready"]
    # but pools that were not ready in between start from Verifying (False)
    waiting, _ = _status(kvpath.KVPathState(), observed=status.Observed(
        _sts(1, 0), _sts(1, 1), _sts(1, 1)), previous=verified)
    st, _ = _status(kvpath.KVPathState(pair=PAIR), previous=waiting)
    assert (_cond(st)["status"], _cond(st)["reason"]) == ("False", kvpath.VERIFYING)


def test_each_new_failure_reason_is_one_event():
    verifying, _ = _status(kvpath.KVPathState(pair=PAIR))
    failed = kvpath.KVPathState(pair=PAIR, outcome=kvpath.Outcome(False, "Unreachable", "x"),
                                retry_in_s=5)
    st, tr = _status(failed, previous=verifying)
    (t,) = [t for t in tr if t.type == "KVPathVerified"]
    assert t.warning and t.reason == "Unreachable"
    again = kvpath.KVPathState(pair=PAIR, outcome=kvpath.Outcome(False, "Unreachable", "x"),
                               retry_in_s=10)
    st2, tr = _status(again, previous=st)
    assert not [t for t in tr if t.type == "KVPathVerified"]  # the same reason: no new Event
    assert "next check in 10s" in _cond(st2)["message"]


# ------------------------------------------------------------------------- network policy
def _builtin_spec() -> dict[str, Any]:
    spec = copy.deepcopy(BASE["spec"])
    spec["engine"] = {"type": "builtin", "image": BUILTIN_IMAGE}
    spec["decode"]["replicas"] = 1
    return spec


def test_the_operator_may_reach_builtin_decode_pods_on_the_engine_port():
    children = render(Owner("demo", "ns", "u"), validate_spec(parse_spec(_builtin_spec()))
                      ).children
    dec = next(c for c in children if c["kind"] == "NetworkPolicy"
               and c["metadata"]["name"] == "demo-decode")
    (rule,) = [r for r in dec["spec"]["ingress"] if "namespaceSelector" in r["from"][0]]
    assert rule["from"][0]["podSelector"]["matchLabels"] == OPERATOR_POD_LABELS
    assert rule["ports"] == [{"protocol": "TCP", "port": 8000}]
    chart = yaml.safe_load((ROOT / "charts/pd-operator/Chart.yaml").read_text())
    assert chart["name"] == OPERATOR_POD_LABELS["app.kubernetes.io/name"]


# ------------------------------------------------------------------------ the check loop
class FakeAPI:
    """Pods per pool, the token Secret, and every status written."""

    def __init__(self) -> None:
        self.pods = {"prefill": [_pod("demo-prefill-0", "p1", "10.0.0.1")],
                     "decode": [_pod("demo-decode-0", "d1", "10.0.0.2")]}
        self.statuses: list[dict[str, Any]] = []
        self.ready = False  # apply answers workloads with all replicas ready (as after a restart)

    async def apply(self, obj, **_):
        if self.ready and obj["kind"] in ("StatefulSet", "Deployment"):
            n = obj["spec"]["replicas"]
            return {**obj, "status": {"readyReplicas": n, "updatedReplicas": n}}
        return obj

    async def create(self, obj, **_):
        return obj

    async def get(self, api_version, kind, namespace, name):
        if kind == "Secret":
            return {"data": {"token": "c2VjcmV0"}}
        return None

    async def list(self, api_version, kind, namespace=None, label_selector=None):
        role = "prefill" if "component=prefill" in (label_selector or "") else "decode"
        return copy.deepcopy(self.pods[role])

    async def patch_merge(self, api_version, kind, namespace, name, patch, subresource=None):
        self.statuses.append(patch["status"])
        return patch

    def kv(self) -> list[tuple[str, str]]:
        out = []
        for st in self.statuses:
            c = _cond(st)
            if not out or out[-1] != (c["status"], c["reason"]):
                out.append((c["status"], c["reason"]))
        return out


@pytest.fixture
def api(monkeypatch):
    fake = FakeAPI()
    monkeypatch.setattr(handlers.RUNTIME, "client", fake)
    monkeypatch.setattr(handlers.RUNTIME, "owned", {})
    monkeypatch.setattr(handlers.RUNTIME, "kv_path_verification", True)
    monkeypatch.setattr(kvpath, "retry_delay", lambda attempt: 0.01)
    events: list[tuple[str, str, str]] = []
    monkeypatch.setattr(kopf, "event", lambda obj, type, reason, message:
                        events.append((type, reason, message)))
    fake.events = events  # type: ignore[attr-defined]
    return fake


def _script(monkeypatch, outcomes: list[kvpath.Outcome]) -> list[tuple[str, str, str]]:
    calls: list[tuple[str, str, str]] = []

    async def check(decode, prefill, token, **_):
        calls.append((decode, prefill, token))
        return outcomes.pop(0)

    monkeypatch.setattr(kvpath_check, "check", check)
    return calls


async def _sts_event(state: handlers.Owned, role: str, ready: int) -> None:
    sts = next(c for c in state.desired_children.values()
               if c["kind"] == "StatefulSet" and c["metadata"]["name"] == f"demo-{role}")
    obj = copy.deepcopy(sts)
    obj["metadata"]["ownerReferences"] = [{"apiVersion": handlers.API_VERSION,
                                           "kind": "PDDeployment", "name": "demo", "uid": "u1"}]
    obj["status"] = {"readyReplicas": ready, "updatedReplicas": obj["spec"]["replicas"]}
    await handlers._child_event("apps/v1", "StatefulSet", {"type": "MODIFIED", "object": obj},
                                logging.getLogger("t"))


async def _settle(state: handlers.Owned) -> None:
    for _ in range(500):
        if state.kv_task is None or state.kv_task.done():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the KV path check did not finish")


def _body() -> kopf.Body:
    return kopf.Body({"apiVersion": handlers.API_VERSION, "kind": "PDDeployment",
                      "metadata": {"name": "demo", "namespace": "ns1", "uid": "u1",
                                   "generation": 1}, "spec": _builtin_spec()})


def _count(reason: str) -> float:
    from pd_operator import metrics

    return metrics.KV_PATH_CHECKS.labels(reason)._value.get()


def test_failure_is_retried_then_verified_and_a_replaced_pod_is_checked_again(api, monkeypatch):
    """The fixture's prefill pool has TP 2: each attempt checks rank 0, then rank 1."""
    ok = kvpath.Outcome(True, "Verified", "", 4 << 20, 0.003)
    before = _count("Verified"), _count("PullFailed")
    calls = _script(monkeypatch, [ok, kvpath.Outcome(False, "PullFailed", "READ failed"),
                                  ok, ok, ok, ok])

    async def scenario() -> handlers.Owned:
        await handlers.reconcile(_body(), logging.getLogger("t"))
        state = handlers.RUNTIME.owned[("ns1", "demo")]
        for role in ("router", "prefill", "decode"):
            if role == "router":
                dep = next(c for c in state.desired_children.values()
                           if c["kind"] == "Deployment")
                handlers._observe(state, {**dep, "status": {"readyReplicas": 1,
                                                            "updatedReplicas": 1}})
                continue
            await _sts_event(state, role, 1)
        await _settle(state)
        assert api.statuses[-1]["phase"] == "Ready"
        # the prefill pod is replaced: not ready, then a new pod (new uid and IP) is ready
        await _sts_event(state, "prefill", 0)
        assert state.kv.pair is None
        api.pods["prefill"] = [_pod("demo-prefill-0", "p2", "10.0.0.3")]
        await _sts_event(state, "prefill", 1)
        await _settle(state)
        return state

    state = asyncio.run(scenario())
    assert api.kv() == [("False", "WaitingForPools"), ("False", "Verifying"),
                        ("False", "PullFailed"), ("True", "Verified"),
                        ("False", "WaitingForPools"), ("False", "Verifying"),
                        ("True", "Verified")]
    assert [c[1] for c in calls] == ["10.0.0.1:5600", "10.0.0.1:5601", "10.0.0.1:5600",
                                     "10.0.0.1:5601", "10.0.0.3:5600", "10.0.0.3:5601"]
    assert {c[0] for c in calls} == {"10.0.0.2:8000"} and {c[2] for c in calls} == {"secret"}
    assert _cond(api.statuses[-1])["message"] == (
        "pulled 4.0 MiB from each of 2 ranks of demo-prefill-0 to demo-decode-0 in 3.0 ms max")
    assert api.statuses[-1]["phase"] == "Ready"
    kinds = [(t, r) for t, r, _ in api.events if r.startswith("KVPath")]
    assert kinds == [("Warning", "KVPathVerifiedFalse"), ("Normal", "KVPathVerified"),
                     ("Warning", "KVPathVerifiedFalse"), ("Normal", "KVPathVerified")]
    assert any(m.startswith("PullFailed: KV pull from rank 1 of demo-prefill-0 (TP 2) to "
                            "demo-decode-0 failed: READ failed") for _, _, m in api.events)
    assert state.kv_task is not None and state.kv_task.done()
    assert (_count("Verified"), _count("PullFailed")) == (before[0] + 2, before[1] + 1)


def test_verification_off_reaches_ready_without_a_check(api, monkeypatch):
    calls = _script(monkeypatch, [])
    monkeypatch.setattr(handlers.RUNTIME, "kv_path_verification", False)

    async def scenario() -> None:
        await handlers.reconcile(_body(), logging.getLogger("t"))
        state = handlers.RUNTIME.owned[("ns1", "demo")]
        dep = next(c for c in state.desired_children.values() if c["kind"] == "Deployment")
        handlers._observe(state, {**dep, "status": {"readyReplicas": 1, "updatedReplicas": 1}})
        for role in ("prefill", "decode"):
            await _sts_event(state, role, 1)
        assert state.kv_task is None

    asyncio.run(scenario())
    assert not calls
    assert api.statuses[-1]["phase"] == "Ready"
    assert _cond(api.statuses[-1])["reason"] == kvpath.DISABLED


# ------------------------------------------------------------------------------ the chart
def test_the_chart_value_passes_the_flag_and_the_operator_parses_it():
    from pd_operator.cli.main import build_parser
    from pd_operator.cli.operator_cmds import options_from
    from tests.unit.test_chart import HELM, _arg, _container, objects

    if not Path(HELM).exists():
        pytest.skip(f"helm is not installed at {HELM}")
    assert _arg(_container(objects()), "--kv-path-verification") is None  # on by default
    container = _container(objects("operator.kvPathVerification=false"))
    assert _arg(container, "--kv-path-verification") == "off"
    assert container["args"][:2] == ["operator", "run"]
    parsed = build_parser().parse_args(container["args"])
    assert options_from(parsed).kv_path_verification is False
    assert options_from(build_parser().parse_args(["operator", "run"])).kv_path_verification


def test_check_deployment_runs_the_operators_check_once(monkeypatch):
    """What `pdctl operator check-kv-path NAME` runs: the same pods, token and ports."""
    fake = FakeAPI()
    stored: dict[str, Any] = {"demo": {"metadata": {"name": "demo", "uid": "u1"},
                                       "spec": _builtin_spec()},
                              "vllm": {"metadata": {"name": "vllm", "uid": "u2"},
                                       "spec": copy.deepcopy(BASE["spec"])}}

    async def get(api_version, kind, namespace, name):
        if kind == "Secret":
            return {"data": {"token": "c2VjcmV0"}}
        return stored.get(name)

    fake.get = get  # type: ignore[method-assign]
    ok = kvpath.Outcome(True, "Verified", "", 4 << 20, 0.003)
    calls = _script(monkeypatch, [ok, ok])
    pair, out = asyncio.run(kvpath_check.check_deployment(fake, "ns1", "demo"))
    assert out.ok and out.ranks == 2 and pair is not None and pair.prefill.name == "demo-prefill-0"
    assert calls == [("10.0.0.2:8000", "10.0.0.1:5600", "secret"),
                     ("10.0.0.2:8000", "10.0.0.1:5601", "secret")]  # prefill TP 2
    stored["tp1"] = copy.deepcopy(stored["demo"])
    stored["tp1"]["spec"]["prefill"]["tensorParallelSize"] = 1
    calls = _script(monkeypatch, [ok])
    pair, out = asyncio.run(kvpath_check.check_deployment(fake, "ns1", "tp1"))
    assert out.ok and out.ranks == 1 and calls == [("10.0.0.2:8000", "10.0.0.1:5600", "secret")]
    pair, out = asyncio.run(kvpath_check.check_deployment(fake, "ns1", "gone"))
    assert pair is None and out.reason == "NotFound"
    pair, out = asyncio.run(kvpath_check.check_deployment(fake, "ns1", "vllm"))
    assert pair is None and out.reason == kvpath.UNSUPPORTED


def test_an_operator_restart_keeps_the_stored_conditions_and_sends_no_events(api, monkeypatch):
    """A new process: the first reconcile finds the stored status current (a no-op write);
    the KV path check that follows compares with that status, not with nothing, so
    KVPathVerified stays True with its time, and no condition is announced again."""
    _script(monkeypatch, [kvpath.Outcome(True, "Verified", "", 4 << 20, 0.003)] * 4)  # 2 ranks

    async def ready_and_checked(stored: dict[str, Any] | None) -> handlers.Owned:
        body = _body()
        if stored is not None:
            body = kopf.Body({**dict(body), "status": stored})
        await handlers.reconcile(body, logging.getLogger("t"))
        state = handlers.RUNTIME.owned[("ns1", "demo")]
        dep = next(c for c in state.desired_children.values() if c["kind"] == "Deployment")
        handlers._observe(state, {**dep, "status": {"readyReplicas": 1, "updatedReplicas": 1}})
        for role in ("prefill", "decode"):
            await _sts_event(state, role, 1)
        await _settle(state)
        return state

    asyncio.run(ready_and_checked(None))
    stored = api.statuses[-1]
    assert _cond(stored)["status"] == "True"
    api.statuses.clear()
    api.events.clear()
    handlers.RUNTIME.owned.clear()  # the restart
    api.ready = True
    state = asyncio.run(ready_and_checked(stored))
    assert state.kv.outcome is not None and state.kv.outcome.ok  # checked again
    assert not api.events
    for st in api.statuses:
        assert _cond(st)["status"] == "True"
        assert _cond(st)["lastTransitionTime"] == _cond(stored)["lastTransitionTime"]
