"""The operator on the real control plane (kwok GPU nodes): webhook, reconciliation, status,
lifecycle, crash recovery. The operator runs as `pdctl operator run --local-webhook`, scoped to
the test's namespace (webhook configurations too), so other tests are never affected."""

from __future__ import annotations

import copy
import datetime
import json
import threading
import time

import pytest
import yaml

from pd_operator import kinds
from pd_operator.render import Owner, render
from pd_operator.validate import parse_spec, validate_spec
from pd_operator.webhook import configs

from op_cluster import (EXAMPLES, Operator, extra_nodes, get_json, install_crd, is_ready,
                        load_example, pdd, running_operator, wait_for, wait_ready, webhook_probe)

pytestmark = pytest.mark.cluster

CHILD_KINDS = ",".join(k.plural for k in kinds.CHILD_KINDS)  # for kubectl get


@pytest.fixture(scope="module")
def cluster_ready(kubectl):
    """The CRD, plus kwok GPU nodes for every GPU product the examples ask for (64 GPUs each)."""
    install_crd(kubectl)
    products = {"NVIDIA-H100-80GB-HBM3": 64, "NVIDIA-H200": 64}
    for path in sorted((EXAMPLES / "accepted").glob("*.yaml")):
        spec = yaml.safe_load(path.read_text())["spec"]
        for role in ("prefill", "decode"):
            sel = ((spec[role].get("template") or {}).get("nodeSelector") or {})
            if "nvidia.com/gpu.product" in sel:
                products.setdefault(sel["nvidia.com/gpu.product"], 64)
    nodes = extra_nodes("pd-op-test", products)
    kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                 "items": nodes}))
    kubectl("wait", "--for=condition=Ready", "--timeout=60s",
            *[f"node/{n['metadata']['name']}" for n in nodes])
    yield
    kubectl("delete", "nodes", "-l", "pd-operator.dev/test-node=pd-op-test", "--wait=false",
            check=False)


@pytest.fixture
def operator(cluster_ready, kubeconfig, kubectl, namespace, tmp_path):
    with running_operator(kubeconfig, kubectl, namespace, tmp_path) as op:
        yield op


def _apply(kubectl, ns: str, obj: dict, check: bool = True):
    obj = copy.deepcopy(obj)
    obj["metadata"]["namespace"] = ns
    return kubectl("apply", "-f", "-", input=json.dumps(obj), check=check)


def _children(kubectl, ns: str, name: str | None = None) -> list[dict]:
    sel = "app.kubernetes.io/managed-by=pd-operator"
    if name:
        sel += f",app.kubernetes.io/instance={name}"
    return get_json(kubectl, CHILD_KINDS, "-n", ns, "-l", sel)["items"]


def _pods(kubectl, ns: str, name: str, role: str) -> list[dict]:
    return get_json(kubectl, "pods", "-n", ns, "-l",
                    f"app.kubernetes.io/instance={name},app.kubernetes.io/component={role}"
                    )["items"]


def _expected(obj: dict) -> list[dict]:
    meta = obj["metadata"]
    return render(Owner(meta["name"], meta["namespace"], meta["uid"]),
                  validate_spec(parse_spec(obj["spec"]))).children


def _container(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]["containers"][0]


# ------------------------------------------------------------------------------ examples
def test_accepted_examples_become_ready_on_gpu_nodes(operator, kubectl, namespace):
    paths = sorted((EXAMPLES / "accepted").glob("*.yaml"))
    assert paths, "no accepted examples"
    docs = [yaml.safe_load(p.read_text()) for p in paths]
    for d in docs:
        d["metadata"]["namespace"] = namespace
    kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                 "items": docs}))
    names = [d["metadata"]["name"] for d in docs]
    live = wait_ready(kubectl, namespace, names, timeout=240)
    nodes = {n["metadata"]["name"]: n for n in get_json(kubectl, "nodes")["items"]}
    for name in names:
        obj = live[name]
        # the mutating webhook made the stored object explicit
        for role in ("prefill", "decode"):
            assert obj["spec"][role]["kvCacheLayout"] in ("HND", "NHD"), name
        assert obj["spec"]["kvTransfer"]["sideChannelPort"] >= 1024
        assert obj["spec"]["engine"].get("version"), name
        assert obj["spec"]["validation"]["policy"] in ("Strict", "Warn", "Disabled"), name
        expected = {(c["kind"], c["metadata"]["name"]): c for c in _expected(obj)}
        got = {(c["kind"], c["metadata"]["name"]): c for c in _children(kubectl, namespace,
                                                                         name)}
        assert set(got) == set(expected), name
        for role in ("prefill", "decode"):
            want = _container(expected[("StatefulSet", f"{name}-{role}")])
            sts = got[("StatefulSet", f"{name}-{role}")]
            assert _container(sts)["command"] == want["command"], (name, role)
            pool = obj["spec"][role]
            gpus = pool.get("tensorParallelSize", 1) * pool.get("pipelineParallelSize", 1) * \
                pool.get("dataParallelSize", 1)
            pods = _pods(kubectl, namespace, name, role)
            assert len(pods) == pool.get("replicas", 1), (name, role)
            for pod in pods:
                assert pod["status"]["phase"] == "Running", (name, pod["metadata"]["name"])
                c = pod["spec"]["containers"][0]
                assert c["command"] == want["command"]
                assert c["resources"]["limits"]["nvidia.com/gpu"] == str(gpus)
                node = nodes[pod["spec"]["nodeName"]]
                assert node["metadata"]["labels"].get("nvidia.com/gpu.present") == "true"
                product = ((pool.get("template") or {}).get("nodeSelector") or {}).get(
                    "nvidia.com/gpu.product")
                if product:
                    assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == product
                env = {e["name"]: e for e in c["env"]}
                assert env["VLLM_NIXL_SIDE_CHANNEL_HOST"]["valueFrom"]["fieldRef"][
                    "fieldPath"] == "status.podIP"
            if obj["spec"]["engine"]["type"] == "vllm":
                cfg = json.loads(want["command"][want["command"].index(
                    "--kv-transfer-config") + 1])
                assert cfg["kv_role"] == {"prefill": "kv_producer",
                                          "decode": "kv_consumer"}[role]
        st = obj["status"]
        assert st["prefill"]["readyReplicas"] == obj["spec"]["prefill"].get("replicas", 1)
        assert {c["type"] for c in st["conditions"]} >= {
            "Validated", "PrefillReady", "DecodeReady", "RouterReady", "KVPathVerified", "Ready"}
        # fake nodes: no KV path to prove; Unknown either way, and Ready all the same
        kv = next(c for c in st["conditions"] if c["type"] == "KVPathVerified")
        builtin = obj["spec"]["engine"]["type"] == "builtin"
        assert (kv["status"], kv["reason"]) == (
            "Unknown", "VerificationDisabled" if builtin else "NotSupportedForEngine"), name
    assert operator.metric("pd_operator_webhook_duration_seconds_count",
                           webhook="validate") >= len(names)


def test_rejected_examples_fail_at_kubectl_with_rule_id(operator, kubectl, namespace):
    paths = sorted((EXAMPLES / "rejected").glob("*.yaml"))
    assert paths, "no rejected examples"
    out = kubectl("apply", "-n", namespace, "-f", str(EXAMPLES / "rejected"), check=False)
    assert out.returncode != 0
    errors = out.stderr.split("Error from server")
    for path in paths:
        doc = yaml.safe_load(path.read_text())
        rule = doc["metadata"]["annotations"]["pd-operator.dev/expect-rule"]
        mine = [e for e in errors if f"'{doc['metadata']['name']}'" in e]
        assert mine, f"{path.name}: no error for it in:\n{out.stderr[:3000]}"
        hook = configs.hook_name("validate", operator.config_name)
        assert f'admission webhook "{hook}" denied the request' in mine[0]
        assert rule in mine[0], f"{path.name}: {rule} not in {mine[0][:800]}"
    assert get_json(kubectl, "pddeployments", "-n", namespace)["items"] == []
    assert operator.metric("pd_operator_verdicts_total", rule="TP-DIVISIBLE") >= 1


# ----------------------------------------------------------------------------- lifecycle
def test_update_scale_roll_drift_delete(operator, kubectl, namespace):
    base = load_example("accepted", "llama-3.1-8b-basic")
    name = base["metadata"]["name"]
    _apply(kubectl, namespace, base)
    obj = wait_ready(kubectl, namespace, [name])[name]
    gen = obj["metadata"]["generation"]
    sts_before = get_json(kubectl, "statefulset", f"{name}-decode", "-n", namespace)

    # 1. an incompatible update of one pool is rejected; nothing changes
    patch = {"spec": {"decode": {"attentionBackend": "FLASHINFER"}}}
    out = kubectl("patch", "pdd", name, "-n", namespace, "--type=merge", "-p",
                  json.dumps(patch), check=False)
    assert out.returncode != 0 and "UPDATE-ONE-POOL" in out.stderr, out.stderr
    after = pdd(kubectl, namespace, name)
    assert after["metadata"]["generation"] == gen and after["spec"] == obj["spec"]
    sts_after = get_json(kubectl, "statefulset", f"{name}-decode", "-n", namespace)
    assert sts_after["metadata"]["generation"] == sts_before["metadata"]["generation"]

    # 2. scale both pools
    kubectl("patch", "pdd", name, "-n", namespace, "--type=merge", "-p",
            json.dumps({"spec": {"prefill": {"replicas": 1}, "decode": {"replicas": 3}}}))
    obj = wait_ready(kubectl, namespace, [name])[name]
    assert obj["status"]["decode"] == {"replicas": 3, "readyReplicas": 3}
    assert obj["status"]["prefill"] == {"replicas": 1, "readyReplicas": 1}
    wait_for("3 decode pods", lambda: len(_pods(kubectl, namespace, name, "decode")) == 3)

    # 3. a compatible change of both pools rolls both (new pods with the new command)
    old_uids = {p["metadata"]["uid"] for p in _pods(kubectl, namespace, name, "decode")}
    kubectl("patch", "pdd", name, "-n", namespace, "--type=merge", "-p", json.dumps(
        {"spec": {"prefill": {"blockSize": 32}, "decode": {"blockSize": 32}}}))
    obj = wait_ready(kubectl, namespace, [name], timeout=180)[name]

    def rolled():
        pods = _pods(kubectl, namespace, name, "decode")
        return len(pods) == 3 and all(
            p["metadata"]["uid"] not in old_uids and p["status"]["phase"] == "Running"
            and "32" == p["spec"]["containers"][0]["command"][
                p["spec"]["containers"][0]["command"].index("--block-size") + 1]
            for p in pods)
    wait_for("decode pods replaced with --block-size 32", rolled, timeout=180)

    # 4. drift: a deleted child comes back, a hand edit is reverted
    svc_uid = get_json(kubectl, "service", f"{name}-router", "-n", namespace)["metadata"]["uid"]
    kubectl("delete", "service", f"{name}-router", "-n", namespace)
    wait_for("the router Service re-created", lambda: get_json(
        kubectl, "service", f"{name}-router", "-n", namespace)["metadata"]["uid"] != svc_uid)
    kubectl("scale", "statefulset", f"{name}-decode", "-n", namespace, "--replicas=1")
    wait_for("decode replicas restored to 3", lambda: get_json(
        kubectl, "statefulset", f"{name}-decode", "-n", namespace)["spec"]["replicas"] == 3)
    kubectl("label", "configmap", f"{name}-config", "-n", namespace, "--overwrite",
            "app.kubernetes.io/managed-by=pd-operator", "app.kubernetes.io/component=hacked")
    wait_for("the ConfigMap label restored", lambda: get_json(
        kubectl, "configmap", f"{name}-config", "-n", namespace)["metadata"]["labels"][
        "app.kubernetes.io/component"] == "config")
    assert operator.metric("pd_operator_drift_repairs_total") >= 3
    wait_ready(kubectl, namespace, [name])

    # 5. events for the transitions
    events = get_json(kubectl, "events", "-n", namespace,
                      f"--field-selector=involvedObject.name={name}")["items"]
    reasons = {e["reason"] for e in events}
    assert {"Validated", "Ready"} <= reasons, reasons

    # 6. delete: the garbage collector removes every child; no finalizer holds the object
    assert not pdd(kubectl, namespace, name)["metadata"].get("finalizers")
    kubectl("delete", "pdd", name, "-n", namespace)
    wait_for("no children left", lambda: _children(kubectl, namespace, name) == [],
             timeout=90)


# ----------------------------------------------------------------------- crash recovery
def _small(i: int) -> dict:
    doc = load_example("accepted", "llama-3.1-8b-basic")
    doc["metadata"] = {"name": f"crash-{i:02d}"}
    for role in ("prefill", "decode"):
        doc["spec"][role]["replicas"] = 1
        doc["spec"][role]["template"].pop("nodeSelector", None)
    return doc


def _hold_lease(kubectl, ns: str, stop: threading.Event) -> None:
    """Keep the leader Lease with a fake holder until `stop` is set (then it expires in 3 s)."""
    while not stop.is_set():
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=test", "-f",
                "-", input=json.dumps({
                    "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": "pd-operator-leader", "namespace": ns},
                    "spec": {"holderIdentity": "fake-holder", "leaseDurationSeconds": 3,
                             "renewTime": now, "acquireTime": now}}), check=False)
        stop.wait(0.5)


def test_kill9_during_reconcile_then_converge(operator, kubectl, namespace):
    # Hold reconciliation back (a fake holder owns the lease) while the webhook admits the 20
    # objects, then let the operator take the lease and kill -9 it after its first applies.
    operator.kill9()
    stop = threading.Event()
    holder = threading.Thread(target=_hold_lease, args=(kubectl, namespace, stop), daemon=True)
    holder.start()
    try:
        wait_for("the fake lease holder", lambda: "fake-holder" in kubectl(
            "get", "lease", "pd-operator-leader", "-n", namespace, "-o",
            "jsonpath={.spec.holderIdentity}").stdout, timeout=20)
        operator.start()
        webhook_probe(kubectl, namespace)
        docs = [_small(i) for i in range(20)]
        for d in docs:
            d["metadata"]["namespace"] = namespace
        kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                     "items": docs}))
        names = [d["metadata"]["name"] for d in docs]
        assert operator.metric("pd_operator_applies_total") == 0
    finally:
        stop.set()
        holder.join(10)
    applied = wait_for("the first applies", lambda: operator.metric(
        "pd_operator_applies_total"), timeout=60, every=0.01)
    operator.kill9()
    assert 0 < applied < 20 * 15, applied
    ready_at_kill = [i for i in get_json(kubectl, "pdd", "-n", namespace)["items"]
                     if is_ready(i)]
    assert len(ready_at_kill) < len(names)
    operator.start()
    live = wait_ready(kubectl, namespace, names, timeout=240)

    children = _children(kubectl, namespace)
    uids = {i["metadata"]["uid"]: n for n, i in live.items()}
    per_owner: dict[str, list[tuple[str, str]]] = {n: [] for n in names}
    for c in children:
        refs = c["metadata"].get("ownerReferences") or []
        assert len(refs) == 1 and refs[0]["uid"] in uids, f"orphan {c['kind']} " \
            f"{c['metadata']['name']}"
        per_owner[uids[refs[0]["uid"]]].append((c["kind"], c["metadata"]["name"]))
    for n in names:
        expected = sorted((c["kind"], c["metadata"]["name"]) for c in _expected(live[n]))
        assert sorted(per_owner[n]) == expected, n  # no duplicate, nothing missing
        for role in ("prefill", "decode"):
            assert len(_pods(kubectl, namespace, n, role)) == 1
    kubectl("delete", "pdd", "--all", "-n", namespace)
    wait_for("every child collected", lambda: _children(kubectl, namespace) == [],
             timeout=120)


def test_second_replica_waits_for_the_lease(operator, kubeconfig, kubectl, namespace, tmp_path):
    second = Operator(kubeconfig, namespace, tmp_path / "second", extra=("--no-webhook",))
    (tmp_path / "second").mkdir()
    second.start()
    try:
        time.sleep(3)
        assert second.alive()
        assert "acquired the leader lease" not in second.output()
        wait_for("the first to hold the lease", lambda: "acquired the leader lease"
                 in operator.output(), timeout=10)
        operator.stop()  # releases the lease
        wait_for("the second to take over", lambda: "acquired the leader lease"
                 in second.output(), timeout=30)
        doc = _small(0)
        _apply(kubectl, namespace, doc)
        wait_ready(kubectl, namespace, [doc["metadata"]["name"]])
    finally:
        second.stop()
