"""Render every child of a PDDeployment (pure): spec + name + namespace + uid -> manifests.

    children = render.render_all(owner, spec)

The kopf handlers only apply the result (server-side apply) and watch it; nothing here talks to
the API server. One module per kind group: pools (StatefulSet, headless Service, PDB), router
(Deployment, Service, RBAC), config (ConfigMap), network (NetworkPolicy); labels are shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pd_runtime.compat import Decision, ResolvedPool, check_pools

from ..api.v1alpha1 import PDDeploymentSpec
from ..resolve import resolve
from . import config, labels, network, pools, router
from .labels import Owner

__all__ = ["Owner", "Rendered", "render_all", "render", "child_key"]


@dataclass
class Rendered:
    prefill: ResolvedPool
    decode: ResolvedPool
    decision: Decision
    children: list[dict[str, Any]]


def render(owner: Owner, spec: PDDeploymentSpec) -> Rendered:
    prefill, decode = resolve(spec)
    decision = check_pools(prefill, decode, spec.validation.policy)
    cm_data = config.data(prefill, decode, decision)
    cfg_hash = config.content_hash(cm_data)
    push = prefill.is_push or decode.is_push
    children: list[dict[str, Any]] = [config.configmap(owner, cm_data)]
    for pool, hash_hex in ((prefill, decision.prefill_hash), (decode, decision.decode_hash)):
        spec_pool = getattr(spec, pool.role)
        children.append(pools.headless_service(owner, pool))
        children.append(pools.statefulset(owner, pool, spec_pool, labels.fingerprint(hash_hex),
                                          cfg_hash))
        children.append(pools.pod_disruption_budget(owner, pool.role))
        children.append(network.policy(owner, pool, push))
    children += router.rbac(owner)
    children.append(router.service(owner))
    children.append(router.deployment(owner, spec.router, prefill.connector))
    children.append(pools.pod_disruption_budget(owner, router.COMPONENT))
    return Rendered(prefill, decode, decision, children)


def render_all(owner: Owner, spec: PDDeploymentSpec) -> list[dict[str, Any]]:
    return render(owner, spec).children


def child_key(obj: dict[str, Any]) -> tuple[str, str, str]:
    """(apiVersion, kind, name): how a child is identified inside one namespace."""
    return obj["apiVersion"], obj["kind"], obj["metadata"]["name"]
