"""The prefill and decode pools: StatefulSet, headless Service, PodDisruptionBudget (pure)."""

from __future__ import annotations

import copy
from typing import Any

from pd_runtime.compat import ENGINE_HTTP_PORT, ResolvedPool, side_channel_ports

from ..api.v1alpha1 import PodTemplateSpec
from . import engine, labels, secret
from .labels import Owner

GPU_RESOURCE = "nvidia.com/gpu"
HTTP_PORT_NAME = "http"
HEALTH_PATH = "/health"


def gpus_per_pod(pool: ResolvedPool) -> int:
    """TP x PP GPUs per engine instance; with DP > 1 every DP rank runs in the same pod
    (`vllm serve --data-parallel-size`), so the pod needs TP x PP x DP."""
    return pool.tp * pool.pp * pool.dp


def _resources(pool: ResolvedPool, template: PodTemplateSpec) -> dict[str, Any]:
    res = copy.deepcopy(dict(template.resources))
    gpus = str(gpus_per_pod(pool))
    res.setdefault("limits", {})[GPU_RESOURCE] = gpus  # TP x PP (x DP): spec.<pool>.*ParallelSize
    if GPU_RESOURCE in res.get("requests", {}):
        res["requests"][GPU_RESOURCE] = gpus
    return res


def _probes() -> dict[str, Any]:
    def get(period: int, failures: int) -> dict[str, Any]:
        return {"httpGet": {"path": HEALTH_PATH, "port": HTTP_PORT_NAME, "scheme": "HTTP"},
                "periodSeconds": period, "failureThreshold": failures, "timeoutSeconds": 5}

    return {
        # Model loading can take many minutes: the startup probe allows up to 60 min.
        "startupProbe": get(10, 360),
        "readinessProbe": get(5, 3),
        "livenessProbe": get(15, 4),
    }


def statefulset(owner: Owner, pool: ResolvedPool, template: PodTemplateSpec, fp: str,
                config_hash: str) -> dict[str, Any]:
    """The pool's engines; `template` is spec.<pool>.template (scheduling, resources, env)."""
    role = pool.role
    name = labels.child_name(owner, role)
    pod_labels = labels.labels(owner, role, role=role, fingerprint_value=fp)
    ports = [{"name": HTTP_PORT_NAME, "containerPort": ENGINE_HTTP_PORT, "protocol": "TCP"}]
    ports += [{"name": f"side-{i}", "containerPort": p, "protocol": "TCP"}
              for i, p in enumerate(side_channel_ports(pool))]
    container: dict[str, Any] = {
        "name": "engine",
        "image": pool.engine_image,  # spec.engine.image (or spec.<pool>.engine.image)
        "command": engine.command(pool),
        "env": engine.env(pool, list(template.env)),
        "ports": ports,
        "resources": _resources(pool, template),
        "volumeMounts": [{"name": "pd-config", "mountPath": engine.CONFIG_MOUNT,
                          "readOnly": True}],
        **_probes(),
    }
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": [{"name": "pd-config",
                     "configMap": {"name": labels.child_name(owner, "config")}}],
    }
    if secret.needed(pool):  # the side-channel token, created once by the handlers
        container["volumeMounts"].append(secret.volume_mount())
        pod_spec["volumes"].append(secret.volume(owner))
        pod_spec["securityContext"] = secret.pod_security_context()
    if template.node_selector:
        pod_spec["nodeSelector"] = dict(template.node_selector)
    if template.tolerations:
        pod_spec["tolerations"] = copy.deepcopy(list(template.tolerations))
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": labels.metadata(owner, name, role, role=role, fingerprint_value=fp),
        "spec": {
            "replicas": pool.replicas,  # spec.<pool>.replicas
            "serviceName": name,
            # Engine instances are independent: start and replace them in parallel.
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": labels.selector_labels(owner, role)},
            "updateStrategy": {"type": "RollingUpdate"},
            "template": {
                "metadata": {"labels": pod_labels,
                             "annotations": {labels.CONFIG_HASH_ANNOTATION: config_hash}},
                "spec": pod_spec,
            },
        },
    }


def headless_service(owner: Owner, pool: ResolvedPool) -> dict[str, Any]:
    role = pool.role
    ports = [{"name": HTTP_PORT_NAME, "port": ENGINE_HTTP_PORT, "targetPort": ENGINE_HTTP_PORT,
              "protocol": "TCP"}]
    ports += [{"name": f"side-{i}", "port": p, "targetPort": p, "protocol": "TCP"}
              for i, p in enumerate(side_channel_ports(pool))]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": labels.metadata(owner, labels.child_name(owner, role), role, role=role),
        "spec": {
            "clusterIP": "None",
            # Peers find each other before they are Ready (the side channel starts first).
            "publishNotReadyAddresses": True,
            "selector": labels.selector_labels(owner, role),
            "ports": ports,
        },
    }


def pod_disruption_budget(owner: Owner, component: str) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": labels.metadata(owner, labels.child_name(owner, component), component,
                                    role=component),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": labels.selector_labels(owner, component)},
        },
    }
