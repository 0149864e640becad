"""The P/D router: vllm-router in P/D mode with Kubernetes pod discovery, and its RBAC (pure).

The router finds the pools' pods by label (role + instance) and talks to their HTTP port; it
needs list/watch on pods in the namespace, hence the ServiceAccount, Role and RoleBinding.

What vllm-router 0.1.17's Kubernetes discovery (kube-rs, src/service_discovery.rs) relies on:
- in-cluster config: KUBERNETES_SERVICE_HOST/PORT and the mounted ServiceAccount token and CA;
  it dials the `kubernetes` Service's ClusterIP over TLS (the API server's certificate must name
  that IP);
- one list + watch of every pod in --service-discovery-namespace, filtered on the router's side:
  a pod matches when it carries every key=value of --prefill-selector (or --decode-selector);
- a pod is added only when its phase is Running and its Ready condition True (the pools'
  readinessProbe on /health), as http://<podIP>:<--service-discovery-port> (the default is 80,
  hence the engine's port here);
- a pod is removed only when it gets a deletionTimestamp; one that just turns NotReady stays
  until the router's own health checks (--health-check-*) mark it;
- the `vllm.ai/bootstrap-port` annotation is read on prefill pods for connectors with a
  bootstrap server (mooncake); NIXL needs none.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from pd_runtime.compat import ENGINE_HTTP_PORT

from .. import __version__
from ..api.v1alpha1 import RouterSpec
from . import labels
from .labels import Owner

COMPONENT = "router"
ROUTER_PORT = 8000
METRICS_PORT = 29000
# The router image when spec.router.image is unset: the operator's own image (it bundles
# vllm-router). In a cluster the chart names that image in ROUTER_IMAGE_ENV, which the operator
# process reads (router_image_from) and passes to render.
DEFAULT_ROUTER_IMAGE = f"ghcr.io/pd-operator/pd-operator:{__version__}"
ROUTER_IMAGE_ENV = "PD_OPERATOR_ROUTER_IMAGE"


def router_image_from(env: Mapping[str, str]) -> str:
    """The default router image given the process environment (the chart sets it)."""
    return env.get(ROUTER_IMAGE_ENV) or DEFAULT_ROUTER_IMAGE


def _selector_args(owner: Owner, role: str) -> list[str]:
    return [f"{labels.ROLE_LABEL}={role}", f"app.kubernetes.io/instance={owner.name}"]


def command(owner: Owner, router: RouterSpec, connector: str) -> list[str]:
    cmd = [
        "vllm-router", "--vllm-pd-disaggregation",
        "--service-discovery",
        "--prefill-selector", *_selector_args(owner, "prefill"),
        "--decode-selector", *_selector_args(owner, "decode"),
        "--service-discovery-namespace", owner.namespace,
        "--service-discovery-port", str(ENGINE_HTTP_PORT),
        "--policy", router.policy,  # spec.router.policy
        "--host", "0.0.0.0", "--port", str(ROUTER_PORT),
        "--prometheus-host", "0.0.0.0", "--prometheus-port", str(METRICS_PORT),
    ]
    if connector == "NixlPushConnector":
        cmd += ["--kv-connector", "nixl"]
    return cmd


def _placement(router: RouterSpec) -> dict[str, Any]:
    """spec.router.nodeSelector / tolerations, copied into the pod spec when set."""
    out: dict[str, Any] = {}
    if router.node_selector:
        out["nodeSelector"] = dict(router.node_selector)
    if router.tolerations:
        out["tolerations"] = copy.deepcopy(list(router.tolerations))
    return out


def deployment(owner: Owner, router: RouterSpec, connector: str,
               default_image: str = DEFAULT_ROUTER_IMAGE) -> dict[str, Any]:
    name = labels.child_name(owner, COMPONENT)
    container: dict[str, Any] = {
        "name": "router",
        "image": router.image or default_image,  # spec.router.image
        "command": command(owner, router, connector),
        "ports": [
            {"name": "http", "containerPort": ROUTER_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 5},
    }
    if router.resources:
        container["resources"] = copy.deepcopy(dict(router.resources))  # spec.router.resources
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": labels.metadata(owner, name, COMPONENT, role=COMPONENT),
        "spec": {
            "replicas": router.replicas,  # spec.router.replicas
            "selector": {"matchLabels": labels.selector_labels(owner, COMPONENT)},
            "template": {
                "metadata": {"labels": labels.labels(owner, COMPONENT, role=COMPONENT)},
                "spec": {
                    "serviceAccountName": name,
                    # Discovery authenticates with this token (kube-rs in-cluster config):
                    # explicit, so a ServiceAccount or policy default of false cannot turn it
                    # off silently.
                    "automountServiceAccountToken": True,
                    "containers": [container],
                    **_placement(router),  # spec.router.nodeSelector / tolerations
                },
            },
        },
    }


def service(owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": labels.metadata(owner, labels.child_name(owner, COMPONENT), COMPONENT,
                                    role=COMPONENT),
        "spec": {
            "selector": labels.selector_labels(owner, COMPONENT),
            "ports": [
                {"name": "http", "port": ROUTER_PORT, "targetPort": "http", "protocol": "TCP"},
                {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics",
                 "protocol": "TCP"},
            ],
        },
    }


def rbac(owner: Owner) -> list[dict[str, Any]]:
    name = labels.child_name(owner, COMPONENT)
    meta = labels.metadata(owner, name, COMPONENT, role=COMPONENT)
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta,
            "rules": [{"apiGroups": [""], "resources": ["pods"],
                       "verbs": ["get", "list", "watch"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": meta,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name,
                          "namespace": owner.namespace}],
        },
    ]
