"""Real kube-scheduler + kwok: GPU requests land on fake GPU nodes and the pods run."""

from __future__ import annotations

import pytest
from kubernetes import client

from pd_dev.devcluster import nodes
from tests.helpers import wait_for

pytestmark = pytest.mark.cluster


DEFAULT_NODES = [s.name for s in nodes.node_specs()]  # what `up` creates (other tests may add more)


def _deployment(name: str, gpus: int, replicas: int, selector: dict | None = None,
                only_default_nodes: bool = False) -> dict:
    spec: dict = {
        "containers": [{
            "name": "engine",
            "image": "example.invalid/engine:never-pulled",
            "resources": {"limits": {nodes.GPU_RESOURCE: str(gpus)}},
        }],
    }
    if selector:
        spec["nodeSelector"] = selector
    if only_default_nodes:
        spec["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{
                "key": "kubernetes.io/hostname", "operator": "In", "values": DEFAULT_NODES}]}]}}}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": spec},
        },
    }


def _pods(core: client.CoreV1Api, ns: str, app: str) -> list:
    return core.list_namespaced_pod(ns, label_selector=f"app={app}").items


def _ready(pod) -> bool:
    return pod.status.phase == "Running" and any(
        c.type == "Ready" and c.status == "True" for c in pod.status.conditions or []
    )


def _diagnose(core: client.CoreV1Api) -> str:
    """GPUs in use per node, and why pending pods are pending (the cluster may be shared)."""
    used: dict[str, int] = {}
    pending = []
    for p in core.list_pod_for_all_namespaces().items:
        gpus = sum(int((c.resources.limits or {}).get(nodes.GPU_RESOURCE, 0))
                   for c in p.spec.containers if c.resources)
        if p.spec.node_name and p.status.phase not in ("Succeeded", "Failed"):
            used[p.spec.node_name] = used.get(p.spec.node_name, 0) + gpus
        elif not p.spec.node_name:
            msg = next((c.message for c in p.status.conditions or []
                        if c.type == "PodScheduled"), "")
            pending.append(f"{p.metadata.namespace}/{p.metadata.name}: {msg}")
    return f"GPUs in use per node: {used}; pending: {pending[:10]}"


def _wait(what: str, pred, core=None):
    """Up to 120 s; at the deadline the GPU use per node and the pending pods are shown."""
    return wait_for(what, pred, timeout=120, every=0.3,
                    diagnose=(lambda: _diagnose(core)) if core is not None else None)


def test_fake_gpu_nodes_advertise_gpus(kube_api):
    core = client.CoreV1Api(kube_api)
    gpu_nodes = [core.read_node(name) for name in DEFAULT_NODES]
    products = set()
    for n in gpu_nodes:
        assert n.status.allocatable[nodes.GPU_RESOURCE] == "8"
        assert any(c.type == "Ready" and c.status == "True" for c in n.status.conditions)
        assert n.metadata.labels[nodes.ZONE_LABEL]
        assert not n.spec.taints, "fake nodes carry no taint: pods need no toleration"
        products.add(n.metadata.labels[nodes.PRODUCT_LABEL])
    assert {"NVIDIA-H100-80GB-HBM3", "NVIDIA-H200"} <= products


def test_gpu_deployment_scheduled_and_running(kube_api, namespace):
    apps, core = client.AppsV1Api(kube_api), client.CoreV1Api(kube_api)
    apps.create_namespaced_deployment(namespace, _deployment("gpu4", gpus=4, replicas=2))
    pods = _wait(
        "2 Running+Ready pods",
        lambda: (p := _pods(core, namespace, "gpu4")) and len(p) == 2 and all(map(_ready, p)) and p,
        core=core,
    )
    gpu_node_names = {n.metadata.name for n in core.list_node(label_selector="type=kwok").items}
    for p in pods:
        assert p.spec.node_name in gpu_node_names
        assert p.status.pod_ip and p.status.pod_ip.startswith("10.0.")  # kwok's fake pod CIDR
    dep = _wait(
        "deployment readyReplicas=2",
        lambda: (d := apps.read_namespaced_deployment(namespace=namespace, name="gpu4"))
        .status.ready_replicas == 2 and d,
    )
    assert dep.status.available_replicas == 2


def test_gpu_product_selector_and_capacity_are_enforced(kube_api, namespace):
    """The scheduler really counts nvidia.com/gpu and honours the product label."""
    apps, core = client.AppsV1Api(kube_api), client.CoreV1Api(kube_api)
    apps.create_namespaced_deployment(
        namespace,
        _deployment("h200", gpus=1, replicas=1,
                    selector={nodes.PRODUCT_LABEL: "NVIDIA-H200"}),
    )
    apps.create_namespaced_deployment(
        namespace, _deployment("too-big", gpus=9, replicas=1, only_default_nodes=True))
    (pod,) = _wait("h200 pod Ready",
                   lambda: (p := _pods(core, namespace, "h200")) and all(map(_ready, p)) and p,
                   core=core)
    node = core.read_node(pod.spec.node_name)
    assert node.metadata.labels[nodes.PRODUCT_LABEL] == "NVIDIA-H200"

    def unschedulable():
        ps = _pods(core, namespace, "too-big")
        if not ps:
            return None
        conds = {c.type: c for c in ps[0].status.conditions or []}
        c = conds.get("PodScheduled")
        return c if c is not None and c.status == "False" else None

    cond = _wait("too-big pod marked unschedulable", unschedulable, core=core)
    assert cond.reason == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in cond.message
    assert _pods(core, namespace, "too-big")[0].spec.node_name is None
