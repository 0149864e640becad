"""render/: the children of a PDDeployment, as pure data."""

from __future__ import annotations

import json

import pytest
from op_fixtures import BASE, examples, load, obj

from pd_operator.render import Owner, child_key, render
from pd_operator.render import labels as L
from pd_operator.validate import SpecError, parse_object, parse_spec, validate_spec

OWNER = Owner("demo", "ns1", "uid-123")


def _render(o):
    return render(OWNER, validate_spec(parse_spec(o["spec"])))


def _by_kind(children):
    out = {}
    for c in children:
        out.setdefault(c["kind"], []).append(c)
    return out


def _sts(children, role):
    return next(c for c in children if c["kind"] == "StatefulSet"
                and c["metadata"]["name"] == f"demo-{role}")


def _flag(cmd, flag):
    return cmd[cmd.index(flag) + 1]


def test_every_child_kind_once_per_role_with_owner_and_labels():
    r = _render(BASE)
    kinds = {k: len(v) for k, v in _by_kind(r.children).items()}
    assert kinds == {"ConfigMap": 1, "Service": 3, "StatefulSet": 2, "PodDisruptionBudget": 3,
                     "NetworkPolicy": 2, "ServiceAccount": 1, "Role": 1, "RoleBinding": 1,
                     "Deployment": 1}
    assert len({child_key(c) for c in r.children}) == len(r.children)
    for c in r.children:
        meta = c["metadata"]
        assert meta["namespace"] == "ns1"
        assert meta["ownerReferences"] == [{
            "apiVersion": "serving.pd-operator.dev/v1alpha1", "kind": "PDDeployment",
            "name": "demo", "uid": "uid-123", "controller": True, "blockOwnerDeletion": True}]
        for key in ("name", "instance", "component", "managed-by", "part-of"):
            assert meta["labels"][f"app.kubernetes.io/{key}"], (c["kind"], key)
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "pd-operator"
        assert meta["labels"]["app.kubernetes.io/instance"] == "demo"


def test_pool_statefulset_gpus_env_ports_probes_and_fingerprint():
    r = _render(obj(decode__dataParallelSize=2, prefill__pipelineParallelSize=2))
    p, d = _sts(r.children, "prefill"), _sts(r.children, "decode")
    pc = p["spec"]["template"]["spec"]["containers"][0]
    dc = d["spec"]["template"]["spec"]["containers"][0]
    assert pc["resources"]["limits"]["nvidia.com/gpu"] == "4"  # TP 2 x PP 2
    assert dc["resources"]["limits"]["nvidia.com/gpu"] == "4"  # TP 2 x DP 2 ranks in the pod
    host = next(e for e in pc["env"] if e["name"] == "VLLM_NIXL_SIDE_CHANNEL_HOST")
    assert host["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert [x["containerPort"] for x in dc["ports"]] == [8000, 5600, 5601]
    assert [x["containerPort"] for x in pc["ports"]] == [8000, 5600]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert pc[probe]["httpGet"]["path"] == "/health"
    fp = r.decision.prefill_hash[:16]
    assert p["metadata"]["labels"][L.FINGERPRINT_LABEL] == fp
    assert p["spec"]["template"]["metadata"]["labels"][L.FINGERPRINT_LABEL] == fp
    assert L.FINGERPRINT_LABEL not in p["spec"]["selector"]["matchLabels"]
    assert p["spec"]["replicas"] == 1 and d["spec"]["replicas"] == 2
    assert p["metadata"]["labels"][L.ROLE_LABEL] == "prefill"


def test_vllm_command_rendered_from_spec():
    r = _render(obj(prefill__kvCacheDtype="fp8", decode__kvCacheDtype="fp8",
                    prefill__blockSize=32, decode__blockSize=32, prefill__args=["--x"]))
    p = _sts(r.children, "prefill")["spec"]["template"]["spec"]["containers"][0]["command"]
    d = _sts(r.children, "decode")["spec"]["template"]["spec"]["containers"][0]["command"]
    assert p[:2] == ["vllm", "serve"]
    assert _flag(p, "--model") == "meta-llama/Llama-3.1-8B-Instruct"
    assert _flag(p, "--tensor-parallel-size") == "2"
    assert _flag(p, "--block-size") == "32"
    assert _flag(p, "--kv-cache-dtype") == "fp8"
    assert _flag(p, "--attention-backend") == "FLASH_ATTN"
    assert p[-1] == "--x"
    kp, kd = json.loads(_flag(p, "--kv-transfer-config")), json.loads(
        _flag(d, "--kv-transfer-config"))
    assert kp["kv_connector"] == kd["kv_connector"] == "NixlConnector"
    assert (kp["kv_role"], kd["kv_role"]) == ("kv_producer", "kv_consumer")
    assert kp["kv_connector_extra_config"] == {"backends": ["UCX"],
                                               "enforce_handshake_compat": True,
                                               "kv_lease_duration": 120}  # operator default


def test_auto_backend_is_not_passed_and_hash_unknown_fingerprint():
    r = _render(obj(prefill__attentionBackend="auto", decode__attentionBackend="auto"))
    cmd = _sts(r.children, "prefill")["spec"]["template"]["spec"]["containers"][0]["command"]
    assert "--attention-backend" not in cmd
    assert _sts(r.children, "prefill")["metadata"]["labels"][L.FINGERPRINT_LABEL] == "unknown"


def test_env_layout_hybrid_ssm_and_user_override():
    o = obj(model__family="hybrid-ssm", model__mambaType="mamba2",
            prefill__kvCacheLayout="NHD", decode__kvCacheLayout="NHD",
            decode__template={"env": [{"name": "VLLM_KV_CACHE_LAYOUT", "value": "NHD"},
                                      {"name": "EXTRA", "value": "1"}]})
    r = _render(o)
    pe = {e["name"]: e.get("value") for e in
          _sts(r.children, "prefill")["spec"]["template"]["spec"]["containers"][0]["env"]}
    de = [e["name"] for e in
          _sts(r.children, "decode")["spec"]["template"]["spec"]["containers"][0]["env"]]
    assert pe["VLLM_SSM_CONV_STATE_LAYOUT"] == "DS"
    assert pe["VLLM_KV_CACHE_LAYOUT"] == "NHD"
    assert de.count("VLLM_KV_CACHE_LAYOUT") == 1 and "EXTRA" in de


def test_builtin_engine_renders_runtime_serve():
    r = _render(obj(engine={"type": "builtin", "image": "ghcr.io/pd-operator/runtime:0.1.0"}))
    cmd = _sts(r.children, "decode")["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[:2] == ["pd-runtime", "serve"]
    assert _flag(cmd, "--role") == "decode"
    assert _flag(cmd, "--tensor-parallel-size") == "2"
    assert _flag(cmd, "--side-channel-port") == "5600"


def test_router_command_rbac_and_service():
    r = _render(obj(router={"replicas": 2, "policy": "cache_aware"}))
    kinds = _by_kind(r.children)
    dep = kinds["Deployment"][0]
    cmd = dep["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[:2] == ["vllm-router", "--vllm-pd-disaggregation"]
    assert "--service-discovery" in cmd
    i = cmd.index("--prefill-selector")
    assert cmd[i + 1:i + 3] == ["serving.pd-operator.dev/role=prefill",
                                "app.kubernetes.io/instance=demo"]
    assert _flag(cmd, "--service-discovery-namespace") == "ns1"
    assert _flag(cmd, "--service-discovery-port") == "8000"
    assert _flag(cmd, "--policy") == "cache_aware"
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == "demo-router"
    role = kinds["Role"][0]
    assert role["rules"][0]["resources"] == ["pods"]
    assert set(role["rules"][0]["verbs"]) == {"get", "list", "watch"}
    assert kinds["RoleBinding"][0]["subjects"][0]["name"] == "demo-router"
    # the router's selector labels exist on the pool pods
    pod_labels = _sts(r.children, "prefill")["spec"]["template"]["metadata"]["labels"]
    assert pod_labels["serving.pd-operator.dev/role"] == "prefill"
    assert pod_labels["app.kubernetes.io/instance"] == "demo"


def test_network_policy_admits_decode_to_prefill_and_router_only():
    r = _render(BASE)
    nps = {c["metadata"]["name"]: c for c in r.children if c["kind"] == "NetworkPolicy"}
    pre = nps["demo-prefill"]["spec"]
    assert pre["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "prefill"
    sources = [rule["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
               for rule in pre["ingress"]]
    assert sorted(sources) == ["decode", "router"]
    dec = nps["demo-decode"]["spec"]
    assert [rule["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
            for rule in dec["ingress"]] == ["router"]
    push = _render(obj(kvTransfer={"connector": "NixlPushConnector"}))
    dec = next(c for c in push.children if c["kind"] == "NetworkPolicy"
               and c["metadata"]["name"] == "demo-decode")
    assert len(dec["spec"]["ingress"]) == 2


def test_config_change_rolls_pods_replica_change_does_not():
    a = _render(BASE)
    b = _render(obj(decode__replicas=5, prefill__replicas=3))
    c = _render(obj(prefill__blockSize=32, decode__blockSize=32))
    d = _render(obj(decode__args=["--max-num-seqs", "8"]))

    def h(r, role):
        meta = _sts(r.children, role)["spec"]["template"]["metadata"]
        return meta["annotations"][L.CONFIG_HASH_ANNOTATION]
    for role in ("prefill", "decode"):
        assert h(a, role) != h(c, role)  # the engine reads the block size: pods roll
        assert h(a, role) == h(b, role)  # scaling restarts nothing
        # the whole pod template is equal: only the StatefulSet's replicas change
        assert _sts(a.children, role)["spec"]["template"] == \
            _sts(b.children, role)["spec"]["template"]
    # a decode-only change leaves the prefill pods alone
    assert h(a, "decode") != h(d, "decode")
    assert h(a, "prefill") == h(d, "prefill")
    # the ConfigMap still records the replicas (pdctl and the docs read them)
    cm = next(x for x in b.children if x["kind"] == "ConfigMap")
    assert json.loads(cm["data"]["decode.json"])["replicas"] == 5


def test_render_is_deterministic():
    assert _render(BASE).children == _render(BASE).children


@pytest.mark.parametrize("path", examples("accepted"), ids=lambda p: p.stem)
def test_accepted_examples_render(path):
    doc = load(path)
    try:
        pdd = parse_object(doc)
    except SpecError as exc:
        pytest.fail(f"example does not parse: {exc}")
    r = render(Owner(doc["metadata"]["name"], "ns", "u"), validate_spec(pdd.spec))
    assert r.decision.accepted
    for role in ("prefill", "decode"):
        sts = next(c for c in r.children if c["kind"] == "StatefulSet"
                   and c["metadata"]["labels"]["serving.pd-operator.dev/role"] == role)
        pool = getattr(pdd.spec, role)
        res = sts["spec"]["template"]["spec"]["containers"][0]["resources"]
        want = pool.tensor_parallel_size * pool.pipeline_parallel_size * \
            pool.data_parallel_size
        assert res["limits"]["nvidia.com/gpu"] == str(want)
        assert len(sts["metadata"]["name"]) <= 63


def test_render_evaluates_no_rule(monkeypatch):
    """render takes the decision validation made; it never runs the rules itself."""
    import pd_runtime.compat as compat
    import pd_runtime.compat.engine as compat_engine

    validated = validate_spec(parse_spec(BASE["spec"]))

    def no_rules(*_a, **_k):
        raise AssertionError("render evaluated the rules")

    monkeypatch.setattr(compat, "check_pools", no_rules)
    monkeypatch.setattr(compat_engine, "check_pools", no_rules)
    assert render(OWNER, validated).decision is validated.decision


def test_router_image_comes_from_the_caller_not_the_environment(monkeypatch):
    from pd_operator import __version__
    from pd_operator.render import DEFAULT_ROUTER_IMAGE, router_image_from

    def image(r):
        dep = next(c for c in r.children if c["kind"] == "Deployment")
        return dep["spec"]["template"]["spec"]["containers"][0]["image"]

    monkeypatch.setenv("PD_OPERATOR_ROUTER_IMAGE", "example.org/ignored:1")
    validated = validate_spec(parse_spec(BASE["spec"]))
    assert DEFAULT_ROUTER_IMAGE.endswith(f":{__version__}")
    assert image(render(OWNER, validated)) == DEFAULT_ROUTER_IMAGE
    assert image(render(OWNER, validated, router_image="example.org/r:2")) == "example.org/r:2"
    assert router_image_from({}) == DEFAULT_ROUTER_IMAGE
    assert router_image_from({"PD_OPERATOR_ROUTER_IMAGE": "example.org/r:3"}) == "example.org/r:3"
    explicit = obj(router={"image": "example.org/own:4"})
    assert image(render(OWNER, validate_spec(parse_spec(explicit["spec"])),
                        router_image="example.org/r:2")) == "example.org/own:4"
