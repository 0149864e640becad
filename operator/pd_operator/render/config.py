"""The ConfigMap with the rendered engine configuration (pure).

`prefill.json` / `decode.json` hold the resolved pool (every value explicit) and the rendered
command; `compatibility.json` the decision. The pods mount it at engine.CONFIG_MOUNT (the
runtime's preflight reads it). Each pool's pod template carries `pool_hash` of its own document,
so a change the pool's engine would see rolls that pool's pods, and nothing else does: scaling
(replicas), the other pool's settings and the decision's text are not read by the engine, and
hashing them would restart every pod of both pools on `kubectl scale`.
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


# Keys of a pool document that the pod does not read (see pd_runtime.serve.preflight) and that
# change without needing a restart: the StatefulSet's own spec carries them.
NOT_READ_BY_ENGINE = frozenset({"replicas"})


def pool_hash(pool: ResolvedPool) -> str:
    """The config-hash annotation of one pool's pods: what its engine reads, nothing else."""
    doc = {k: v for k, v in pool_document(pool).items() if k not in NOT_READ_BY_ENGINE}
    blob = json.dumps(doc, sort_keys=True, default=list).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def configmap(owner: Owner, cm_data: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": labels.metadata(owner, labels.child_name(owner, "config"), "config"),
        "data": cm_data,
    }
