"""Render every child of a PDDeployment (pure): owner + validated spec -> manifests.

    rendered = render.render(owner, validate.validate_spec(spec))

`render` evaluates no rule and reads no environment: it takes what validation produced (the
resolved pools and the decision) and the router's default image from its caller. The kopf
handlers only apply the result (server-side apply) and watch it; nothing here talks to the API
server. One module per kind group: pools (StatefulSet, headless Service, PDB), router
(Deployment, Service, RBAC), config (ConfigMap), network (NetworkPolicy); labels are shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pd_runtime.compat import Decision, ResolvedPool

from ..validate import Validated
from . import config, labels, network, pools, router
from .labels import Owner
from .router import DEFAULT_ROUTER_IMAGE, router_image_from

__all__ = ["DEFAULT_ROUTER_IMAGE", "Owner", "Rendered", "child_key", "render",
           "router_image_from"]


@dataclass
class Rendered:
    prefill: ResolvedPool
    decode: ResolvedPool
    decision: Decision
    children: list[dict[str, Any]]


def render(owner: Owner, validated: Validated,
           router_image: str = DEFAULT_ROUTER_IMAGE) -> Rendered:
    """Every child object; `router_image` is used when spec.router.image is unset."""
    spec, prefill, decode = validated.spec, validated.prefill, validated.decode
    decision = validated.decision
    cm_data = config.data(prefill, decode, decision)
    push = prefill.is_push or decode.is_push
    children: list[dict[str, Any]] = [config.configmap(owner, cm_data)]
    for pool, hash_hex in ((prefill, decision.prefill_hash), (decode, decision.decode_hash)):
        template = getattr(spec, pool.role).template
        children.append(pools.headless_service(owner, pool))
        children.append(pools.statefulset(owner, pool, template, labels.fingerprint(hash_hex),
                                          config.pool_hash(pool)))
        children.append(pools.pod_disruption_budget(owner, pool.role))
        children.append(network.policy(owner, pool, push))
    children += router.rbac(owner)
    children.append(router.service(owner))
    children.append(router.deployment(owner, spec.router, prefill.connector, router_image))
    children.append(pools.pod_disruption_budget(owner, router.COMPONENT))
    return Rendered(prefill, decode, decision, children)


def child_key(obj: dict[str, Any]) -> tuple[str, str, str]:
    """(apiVersion, kind, name): how a child is identified inside one namespace."""
    return obj["apiVersion"], obj["kind"], obj["metadata"]["name"]
