"""The router's pod: placement (spec.router.nodeSelector / tolerations / resources) and what
vllm-router's Kubernetes discovery needs from the rendered Deployment, RBAC and pool pods."""

from __future__ import annotations

import pytest
from op_fixtures import obj

from pd_operator.render import Owner, render
from pd_operator.validate import SpecError, parse_spec, validate_spec
from pd_operator.webhook import review

OWNER = Owner("demo", "ns1", "uid-123")
REAL_NODE = {"nodeSelector": {"pd-operator.dev/real-node": "true"},
             "tolerations": [{"key": "pd-operator.dev/real-node", "operator": "Equal",
                              "value": "true", "effect": "NoSchedule"}]}


def _children(o):
    return render(OWNER, validate_spec(parse_spec(o["spec"]))).children


def _one(children, kind, name=None):
    found = [c for c in children if c["kind"] == kind
             and (name is None or c["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def _router_pod(children):
    return _one(children, "Deployment", "demo-router")["spec"]["template"]["spec"]


def test_router_follows_the_pools_onto_a_tainted_node():
    pod = _router_pod(_children(obj(router={**REAL_NODE, "resources": {
        "requests": {"cpu": "100m", "memory": 128 * 2**20}, "limits": {"memory": "1Gi"}}})))
    assert pod["nodeSelector"] == REAL_NODE["nodeSelector"]
    assert pod["tolerations"] == REAL_NODE["tolerations"]
    # kept in the core/v1 JSON form (an integer quantity becomes its string)
    assert pod["containers"][0]["resources"] == {
        "requests": {"cpu": "100m", "memory": str(128 * 2**20)}, "limits": {"memory": "1Gi"}}


def test_unset_placement_renders_nothing():
    pod = _router_pod(_children(obj()))
    assert "nodeSelector" not in pod and "tolerations" not in pod
    assert "resources" not in pod["containers"][0]


def test_router_placement_is_independent_of_the_pools():
    o = obj(router={"nodeSelector": {"zone": "a"}})
    o["spec"]["prefill"]["template"] = {"nodeSelector": {"zone": "b"}}
    children = _children(o)
    assert _router_pod(children)["nodeSelector"] == {"zone": "a"}
    sts = _one(children, "StatefulSet", "demo-prefill")["spec"]["template"]["spec"]
    assert sts["nodeSelector"] == {"zone": "b"}


@pytest.mark.parametrize("router, path, words", [
    ({"nodeSelector": {"a b": "v"}}, "spec.router.nodeSelector", "qualified name"),
    ({"nodeSelector": {"k": "x" * 64}}, "spec.router.nodeSelector", "at most 63"),
    ({"tolerations": [{"operator": "Exists", "value": "x"}]}, "spec.router.tolerations", "[0]"),
    ({"tolerations": [{"key": "k", "tolerationSeconds": 5}]}, "spec.router.tolerations",
     "NoExecute"),
    ({"resources": {"limits": {"cpu": "abc"}}}, "spec.router.resources", "not a quantity"),
    ({"resources": {"limits": {"cpu": "1"}, "requests": {"cpu": "2"}}},
     "spec.router.resources", "less than or equal"),
])
def test_bad_router_placement_is_refused_with_its_path(router, path, words):
    with pytest.raises(SpecError) as err:
        parse_spec(obj(router=router)["spec"])
    assert any(p == path and words in m for p, m in err.value.problems), err.value.problems
    out = review.validate({"operation": "CREATE", "object": obj(router=router)})
    assert not out.allowed and path in out.message


def test_discovery_can_authenticate_and_list_pods():
    children = _children(obj())
    pod = _router_pod(children)
    assert pod["serviceAccountName"] == "demo-router"
    assert pod["automountServiceAccountToken"] is True  # kube-rs in-cluster config reads it
    role = _one(children, "Role", "demo-router")
    (rule,) = role["rules"]
    assert rule["apiGroups"] == [""] and rule["resources"] == ["pods"]
    assert {"list", "watch"} <= set(rule["verbs"])  # kube-rs watcher: list, then watch
    binding = _one(children, "RoleBinding", "demo-router")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "demo-router",
                                    "namespace": "ns1"}]


def test_vllm_router_parses_the_selectors_that_match_exactly_its_pools():
    """The rendered flags as vllm-router 0.1.17's own parser reads them; its discovery adds a
    pod when every key=value of a selector is among the pod's labels, at the discovery port,
    once the pod is Ready (the pools' readinessProbe)."""
    launch = pytest.importorskip("vllm_router.launch_router")
    children = _children(obj())
    cmd = _one(children, "Deployment", "demo-router")["spec"]["template"]["spec"][
        "containers"][0]["command"]
    args = launch.parse_router_args(cmd[1:])
    assert args.service_discovery and args.vllm_pd_disaggregation
    assert args.service_discovery_namespace == "ns1"

    def matches(selector, pod_labels):
        return bool(selector) and all(pod_labels.get(k) == v for k, v in selector.items())

    pods = {c["metadata"]["name"]: c["spec"]["template"] for c in children
            if c["kind"] in ("StatefulSet", "Deployment")}
    for role, selector in (("prefill", args.prefill_selector),
                           ("decode", args.decode_selector)):
        matched = {n for n, t in pods.items() if matches(selector, t["metadata"]["labels"])}
        assert matched == {f"demo-{role}"}, (role, selector)
        engine = pods[f"demo-{role}"]["spec"]["containers"][0]
        http = {p["name"]: p["containerPort"] for p in engine["ports"]}["http"]
        assert args.service_discovery_port == http  # not vllm-router's default of 80
        assert engine["readinessProbe"]["httpGet"]["port"] == "http"
    # another PDDeployment's pools in the same namespace are not matched
    other = render(Owner("other", "ns1", "uid-9"), validate_spec(parse_spec(obj()["spec"])))
    other_labels = [c["spec"]["template"]["metadata"]["labels"] for c in other.children
                    if c["kind"] == "StatefulSet"]
    assert not any(matches(args.prefill_selector, lb) or matches(args.decode_selector, lb)
                   for lb in other_labels)

