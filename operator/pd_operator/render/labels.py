"""Names, labels and owner references shared by every rendered child (pure).

Every child of a PDDeployment carries the `app.kubernetes.io/*` labels, the pool role and, on the
pools, the compatibility fingerprint (a prefix of the predicted engine hash). Selectors use only
the stable labels (instance + component), because a StatefulSet selector is immutable while the
fingerprint changes whenever a hash factor does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..api import v1alpha1 as api

MANAGER = "pd-operator"  # app.kubernetes.io/managed-by and the server-side apply field manager
APP_NAME = "pd-serving"  # app.kubernetes.io/name of every child
ROLE_LABEL = f"{api.GROUP}/role"  # prefill | decode | router
FINGERPRINT_LABEL = f"{api.GROUP}/fingerprint"  # first 16 hex chars of the pool's hash
OWNER_LABEL = f"{api.GROUP}/owner"  # the PDDeployment's name (for watches and lookups)
CONFIG_HASH_ANNOTATION = f"{api.GROUP}/config-hash"  # rolls pods when rendered config changes
FINGERPRINT_LEN = 16
UNKNOWN_FINGERPRINT = "unknown"

MANAGED_BY_SELECTOR = {"app.kubernetes.io/managed-by": MANAGER}


@dataclass(frozen=True)
class Owner:
    """What the children need to know about their PDDeployment."""

    name: str
    namespace: str
    uid: str

    def ref(self) -> dict[str, Any]:
        return {
            "apiVersion": f"{api.GROUP}/{api.VERSION}",
            "kind": api.KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def child_name(owner: Owner, suffix: str) -> str:
    return f"{owner.name}-{suffix}"


def fingerprint(hash_hex: str | None) -> str:
    return hash_hex[:FINGERPRINT_LEN] if hash_hex else UNKNOWN_FINGERPRINT


def selector_labels(owner: Owner, component: str) -> dict[str, str]:
    """The immutable subset used in selectors (StatefulSet, Deployment, Service, PDB)."""
    return {"app.kubernetes.io/instance": owner.name, "app.kubernetes.io/component": component}


def labels(owner: Owner, component: str, *, role: str | None = None,
           fingerprint_value: str | None = None) -> dict[str, str]:
    out = {
        "app.kubernetes.io/name": APP_NAME,
        "app.kubernetes.io/instance": owner.name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": MANAGER,
        "app.kubernetes.io/part-of": owner.name,
        OWNER_LABEL: owner.name,
    }
    if role:
        out[ROLE_LABEL] = role
    if fingerprint_value:
        out[FINGERPRINT_LABEL] = fingerprint_value
    return out


def metadata(owner: Owner, name: str, component: str, *, role: str | None = None,
             fingerprint_value: str | None = None,
             annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": owner.namespace,
        "labels": labels(owner, component, role=role, fingerprint_value=fingerprint_value),
        "ownerReferences": [owner.ref()],
    }
    if annotations:
        meta["annotations"] = annotations
    return meta
