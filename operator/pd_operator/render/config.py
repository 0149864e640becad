"""The ConfigMap with the rendered engine configuration (pure).

`prefill.json` / `decode.json` hold the resolved pool (every value explicit) and the rendered
command; `compatibility.json` the decision. The pods mount it at engine.CONFIG_MOUNT (the
runtime's preflight reads it), and its hash is a pod-template annotation so a change rolls pods.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from pd_runtime.compat import Decision, ResolvedPool

from . import engine, labels
from .labels import Owner


def pool_document(pool: ResolvedPool) -> dict[str, Any]:
    doc = dataclasses.asdict(pool)
    doc.pop("origin", None)
    doc["command"] = engine.command(pool)
    return doc


def data(prefill: ResolvedPool, decode: ResolvedPool, decision: Decision) -> dict[str, str]:
    def dump(x: Any) -> str:
        return json.dumps(x, sort_keys=True, indent=1, default=list)

    return {
        "prefill.json": dump(pool_document(prefill)),
        "decode.json": dump(pool_document(decode)),
        "compatibility.json": dump(decision.to_dict()),
    }


def content_hash(cm_data: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(cm_data, sort_keys=True).encode()).hexdigest()[:16]


def configmap(owner: Owner, cm_data: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": labels.metadata(owner, labels.child_name(owner, "config"), "config"),
        "data": cm_data,
    }
