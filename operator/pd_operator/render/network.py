"""NetworkPolicies for the pools (pure).

Admitted, and nothing else (rule E27 of vllm-nixl-rules.md §14):
- router -> both pools, on the engine HTTP port;
- decode -> prefill: the side-channel ports (base .. base+DP-1) and the NIXL/UCX data path. UCX
  picks its data ports at run time, so the data path is admitted as every TCP port from decode
  pods of the same deployment (still nothing from other pods);
- push connector only: prefill -> decode the same way (P writes into D);
- builtin decode pools: the operator (the chart's pod labels, any namespace) -> decode, on the
  engine HTTP port, for the KV path check (KVPathVerified; the endpoint also wants the token).
Egress is not restricted (DNS, model downloads).
"""

from __future__ import annotations

from typing import Any

from pd_runtime.compat import ENGINE_HTTP_PORT, ResolvedPool, side_channel_ports

from . import labels
from .labels import Owner

DATA_PORT_RANGE = (1024, 65535)
# the operator's pods as the chart labels them (app.kubernetes.io/name is the chart's name)
OPERATOR_POD_LABELS = {"app.kubernetes.io/name": "pd-operator",
                       "app.kubernetes.io/component": "operator"}


def _from(owner: Owner, component: str) -> dict[str, Any]:
    return {"podSelector": {"matchLabels": labels.selector_labels(owner, component)}}


def _peer_rule(owner: Owner, src: str, target: ResolvedPool) -> dict[str, Any]:
    ports = [{"protocol": "TCP", "port": p} for p in side_channel_ports(target)]
    ports.append({"protocol": "TCP", "port": DATA_PORT_RANGE[0], "endPort": DATA_PORT_RANGE[1]})
    return {"from": [_from(owner, src)], "ports": ports}


def policy(owner: Owner, target: ResolvedPool, push: bool) -> dict[str, Any]:
    role = target.role
    ingress = [{"from": [_from(owner, "router")],
                "ports": [{"protocol": "TCP", "port": ENGINE_HTTP_PORT}]}]
    if role == "prefill":
        ingress.append(_peer_rule(owner, "decode", target))
    elif push:
        ingress.append(_peer_rule(owner, "prefill", target))
    if role == "decode" and target.engine_type == "builtin":
        ingress.append({"from": [{"namespaceSelector": {},
                                  "podSelector": {"matchLabels": dict(OPERATOR_POD_LABELS)}}],
                        "ports": [{"protocol": "TCP", "port": ENGINE_HTTP_PORT}]})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": labels.metadata(owner, labels.child_name(owner, role), role, role=role),
        "spec": {
            "podSelector": {"matchLabels": labels.selector_labels(owner, role)},
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    }
