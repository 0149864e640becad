"""The Validating- and MutatingWebhookConfiguration objects (pure).

In a cluster the chart owns them (clientConfig.service); `pdctl operator run --local-webhook`
registers these with clientConfig.url pointing at the host process.
"""

from __future__ import annotations

import base64
from typing import Any

from ..api import v1alpha1 as api

NAME = "pd-operator.serving.pd-operator.dev"
VALIDATE_PATH = "/validate"
MUTATE_PATH = "/mutate"
# The API server waits at most this long; the review is pure CPU work (about a millisecond),
# so 5 s only matters when the operator is unreachable, where failurePolicy Fail then rejects.
TIMEOUT_SECONDS = 5


def hook_name(kind: str, config_name: str) -> str:
    """The webhook's own name (a DNS name with at least three labels, as the API requires)."""
    name = f"{kind}.{config_name}"
    return name if name.count(".") >= 2 else f"{name}.pd-operator.dev"


def _rules() -> list[dict[str, Any]]:
    return [{"apiGroups": [api.GROUP], "apiVersions": [api.VERSION],
             "operations": ["CREATE", "UPDATE"], "resources": [api.PLURAL],
             "scope": "Namespaced"}]


def client_config_url(base_url: str, path: str, ca_pem: bytes) -> dict[str, Any]:
    return {"url": base_url.rstrip("/") + path, "caBundle": base64.b64encode(ca_pem).decode()}


def _webhook(name: str, client_config: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "clientConfig": client_config,
        "rules": _rules(),
        "admissionReviewVersions": ["v1"],
        "sideEffects": "None",
        "failurePolicy": "Fail",
        "matchPolicy": "Equivalent",
        "timeoutSeconds": TIMEOUT_SECONDS,
    }


def validating(base_url: str, ca_pem: bytes, name: str = NAME) -> dict[str, Any]:
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "pd-operator"}},
        "webhooks": [_webhook(hook_name("validate", name),
                              client_config_url(base_url, VALIDATE_PATH, ca_pem))],
    }


def _pool_version_missing(role: str) -> str:
    e = f"object.spec.{role}.engine"
    return f"(has(object.spec.{role}.engine) && has({e}.image) && !has({e}.version))"


# The mutating webhook is only called when a default it writes is missing (review.defaults_patch
# is the authority; this mirrors it). Stored objects are explicit, so updates skip the call.
DEFAULTS_MISSING = " || ".join([
    "!has(object.spec.engine.version)",
    "!has(object.spec.kvTransfer)", "!has(object.spec.kvTransfer.sideChannelPort)",
    "!has(object.spec.validation)", "!has(object.spec.validation.policy)",
    "!has(object.spec.prefill.kvCacheLayout)", "!has(object.spec.decode.kvCacheLayout)",
    _pool_version_missing("prefill"), _pool_version_missing("decode"),
])


MUTATE_MATCH_CONDITIONS = [{
    "name": "defaults-missing",
    # a spec without these maps is a schema error the validating webhook reports
    "expression": "has(object.spec) && has(object.spec.engine) && has(object.spec.prefill)"
                  " && has(object.spec.decode) ? (" + DEFAULTS_MISSING + ") : false",
}]


def mutating(base_url: str, ca_pem: bytes, name: str = NAME) -> dict[str, Any]:
    hook = _webhook(hook_name("mutate", name), client_config_url(base_url, MUTATE_PATH, ca_pem))
    hook["reinvocationPolicy"] = "Never"
    hook["matchConditions"] = MUTATE_MATCH_CONDITIONS
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "pd-operator"}},
        "webhooks": [hook],
    }
