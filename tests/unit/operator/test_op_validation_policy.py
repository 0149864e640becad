"""validation.policy honesty (issue 11 item 5): Disabled reports "not validated", the one-pool
update check survives switching to Disabled, and an administrator can forbid policies."""

from __future__ import annotations

import argparse
import asyncio

import pytest
from aiohttp.test_utils import TestClient, TestServer
from op_fixtures import BASE, obj

from pd_operator import status
from pd_operator.cli import operator_cmds
from pd_operator.validate import parse_spec, validate_spec
from pd_operator.webhook import namespaces, review, server

DESIRED = {"prefill": 1, "decode": 1, "router": 1}
INCOMPATIBLE = {"prefill__tensorParallelSize": 3, "decode__tensorParallelSize": 2}


def _request(op, new, old=None):
    req = {"uid": "u", "operation": op, "object": new, "name": new["metadata"]["name"]}
    if old is not None:
        req["oldObject"] = old
    return req


def _validated_condition(o, policy):
    decision = validate_spec(parse_spec(o["spec"])).decision
    st, _ = status.compute(generation=1, desired=DESIRED, decision=decision,
                           observed=status.Observed(None, None, None), previous=None, now="t",
                           policy=policy)
    return {c["type"]: c for c in st["conditions"]}["Validated"]


def test_disabled_incompatible_pair_is_not_reported_validated():
    bad = obj(validation={"policy": "Disabled"}, **INCOMPATIBLE)
    cond = _validated_condition(bad, "Disabled")
    assert cond["status"] == "Unknown" and cond["reason"] == "ValidationDisabled"
    assert cond["message"] == "validation.policy is Disabled: the pools were not checked"


def test_strict_compatible_pair_still_accepted():
    cond = _validated_condition(BASE, "Strict")
    assert (cond["status"], cond["reason"]) == ("True", "Accepted")


def test_disabled_admission_warns_that_nothing_was_checked():
    out = review.validate(_request("CREATE", obj(validation={"policy": "Disabled"})))
    assert out.allowed and out.warnings[0] == review.DISABLED_WARNING


def test_switching_to_disabled_does_not_skip_the_one_pool_check():
    new = obj(decode__attentionBackend="FLASHINFER", validation={"policy": "Disabled"})
    out = review.validate(_request("UPDATE", new, BASE))  # BASE: Strict
    assert not out.allowed and review.UPDATE_RULE in out.message


def test_switching_from_warn_to_disabled_keeps_the_one_pool_warning():
    old = obj(validation={"policy": "Warn"})
    new = obj(decode__attentionBackend="FLASHINFER", validation={"policy": "Disabled"})
    out = review.validate(_request("UPDATE", new, old))
    assert out.allowed and any(w.startswith(review.UPDATE_RULE) for w in out.warnings)


def test_already_disabled_skips_the_one_pool_check():
    old = obj(validation={"policy": "Disabled"})
    new = obj(decode__attentionBackend="FLASHINFER", validation={"policy": "Disabled"})
    assert review.validate(_request("UPDATE", new, old)).allowed


@pytest.mark.parametrize("policy", ["Disabled", "Warn"])
def test_forbidden_policy_is_rejected_with_rule_field_and_fix(policy):
    o = obj(validation={"policy": policy})
    out = review.validate(_request("CREATE", o), frozenset({"Disabled", "Warn"}))
    assert not out.allowed
    assert review.FORBIDDEN_RULE in out.message and "spec.validation.policy" in out.message
    assert "fix: set spec.validation.policy to 'Strict'" in out.message
    assert [v.rule for v in out.verdicts] == [review.FORBIDDEN_RULE]


def test_forbidding_disabled_leaves_warn_allowed_and_named_in_the_fix():
    forbid = frozenset({"Disabled"})
    out = review.validate(_request("CREATE", obj(validation={"policy": "Disabled"})), forbid)
    assert not out.allowed and "'Strict' or 'Warn'" in out.message
    assert review.validate(_request("CREATE", obj(validation={"policy": "Warn"})), forbid).allowed
    assert review.validate(_request("CREATE", BASE), forbid).allowed


def test_forbidden_policy_on_update_rejected_but_metadata_only_update_allowed():
    forbid = frozenset({"Disabled"})
    old = obj(validation={"policy": "Disabled"})
    changed = obj(decode__replicas=3, validation={"policy": "Disabled"})
    assert not review.validate(_request("UPDATE", changed, old), forbid).allowed
    labelled = obj(validation={"policy": "Disabled"})
    labelled["metadata"]["labels"] = {"team": "a"}
    assert review.validate(_request("UPDATE", labelled, old), forbid).allowed


def test_review_validate_and_server_app_pass_the_forbidden_set():
    envelope = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                "request": _request("CREATE", obj(validation={"policy": "Warn"}))}
    answer, _ = review.review_validate(envelope, frozenset({"Warn"}))
    assert answer["response"]["allowed"] is False

    async def post() -> dict:
        async with TestClient(TestServer(server.app(frozenset({"Warn"})))) as client:
            resp = await client.post("/validate", json=envelope)
            return await resp.json()

    served = asyncio.run(asyncio.wait_for(post(), 30))
    assert served["response"]["allowed"] is False
    assert review.FORBIDDEN_RULE in served["response"]["status"]["message"]


def _run_args(*extra):
    parser = argparse.ArgumentParser()
    operator_cmds.register(parser.add_subparsers())
    return parser.parse_args(["operator", "run", "--local-webhook", *extra])


def test_flag_reaches_the_webhook_options():
    opts = operator_cmds.options_from(_run_args("--forbid-validation-policies", "Disabled,Warn"))
    assert opts.webhook is not None
    assert opts.webhook.forbidden_policies == frozenset({"Disabled", "Warn"})
    none = operator_cmds.options_from(_run_args())
    assert none.webhook is not None and none.webhook.forbidden_policies == frozenset()


@pytest.mark.parametrize("text", ["Strict", "Disabld", "Disabled,strict"])
def test_flag_refuses_unknown_or_strict(text):
    with pytest.raises(ValueError, match="--forbid-validation-policies"):
        operator_cmds.options_from(_run_args("--forbid-validation-policies", text))


# --------------------------------------------------------------- per-namespace label
def test_label_value_names_the_forbidden_policies():
    assert namespaces.policies_from_label("Disabled.Warn") == frozenset({"Disabled", "Warn"})
    assert namespaces.policies_from_label("Disabled") == frozenset({"Disabled"})
    assert namespaces.policies_from_label("") == frozenset()
    # Strict can never be forbidden; a typo forbids nothing rather than break admission
    assert namespaces.policies_from_label("Strict.Disabld.Warn") == frozenset({"Warn"})


def test_namespace_label_forbids_with_its_source_named():
    req = _request("CREATE", obj(validation={"policy": "Warn"}))
    req["namespace"] = "team-a"
    out = review.validate(req, frozenset(), frozenset({"Warn"}))
    assert not out.allowed and review.FORBIDDEN_RULE in out.message
    assert f"label {namespaces.FORBID_LABEL}=Warn on namespace 'team-a'" in out.message
    assert "fix: set spec.validation.policy to 'Strict' or 'Disabled'" in out.message
    assert review.validate(req, frozenset(), frozenset({"Disabled"})).allowed


class FakeReader:
    def __init__(self, labels):
        self.labels, self.calls, self.fail = labels, 0, False

    async def __call__(self, namespace):
        self.calls += 1
        if self.fail:
            raise OSError("connection refused")
        return self.labels.get(namespace, {})


def test_namespace_policies_cache_refresh_and_fallback():
    now = [0.0]
    reader = FakeReader({"a": {namespaces.FORBID_LABEL: "Disabled"}})
    cache = namespaces.NamespacePolicies(reader, ttl=30, clock=lambda: now[0])

    async def scenario():
        assert await cache.forbidden("a") == frozenset({"Disabled"})
        assert await cache.forbidden("a") == frozenset({"Disabled"}) and reader.calls == 1
        assert await cache.forbidden("b") == frozenset()
        now[0] = 31.0
        reader.labels["a"] = {namespaces.FORBID_LABEL: "Disabled.Warn"}
        assert await cache.forbidden("a") == frozenset({"Disabled", "Warn"})
        now[0] = 62.0
        reader.fail = True  # an unreadable namespace keeps its last answer ...
        assert await cache.forbidden("a") == frozenset({"Disabled", "Warn"})
        with pytest.raises(namespaces.NamespaceUnreadable, match="'c'"):
            await cache.forbidden("c")  # ... and one never read is refused, not guessed

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_label_reader_lists_one_namespace_by_field_selector():
    calls = []

    class Client:
        async def request(self, method, path, params=None):
            calls.append((method, path, params))
            return {"items": [{"metadata": {"name": "a", "labels": {"x": "y"}}}]}

    labels = asyncio.run(namespaces.label_reader(Client())("a"))
    assert labels == {"x": "y"}
    # list (granted to the operator for kopf), never get: no new RBAC
    assert calls == [("GET", "/api/v1/namespaces", {"fieldSelector": "metadata.name=a"})]


def test_validator_combines_flag_and_label_and_fails_closed():
    reader = FakeReader({"team-a": {namespaces.FORBID_LABEL: "Disabled"}})
    validate = server.validator(frozenset({"Warn"}), namespaces.NamespacePolicies(reader))

    def envelope(policy, ns):
        req = _request("CREATE", obj(validation={"policy": policy}))
        req["namespace"] = ns
        return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": req}

    def allowed(policy, ns):
        answer, _ = asyncio.run(asyncio.wait_for(validate(envelope(policy, ns)), 10))
        return answer["response"]

    assert allowed("Disabled", "team-a")["allowed"] is False
    assert allowed("Disabled", "team-b")["allowed"] is True
    assert allowed("Warn", "team-b")["allowed"] is False
    calls = reader.calls
    assert allowed("Strict", "team-a")["allowed"] is True
    assert reader.calls == calls  # Strict is never forbidden: no namespace read
    reader.fail = True
    refused = allowed("Disabled", "team-c")
    assert refused["allowed"] is False and refused["status"]["code"] == 503
    assert "namespace 'team-c'" in refused["status"]["message"]
    assert allowed("Strict", "team-c")["allowed"] is True
