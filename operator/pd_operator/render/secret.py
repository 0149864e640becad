"""The side-channel token Secret of a PDDeployment (pure).

Both pools' builtin engines sign every side-channel frame with one shared token
(pd_runtime.handshake). The operator creates the Secret once per PDDeployment, with a random
value chosen by the handlers (render stays pure and deterministic), and never re-renders it: a
new value on every reconcile would break the pairing of running pods. Its owner reference lets
garbage collection delete it with the PDDeployment.
"""

from __future__ import annotations

import base64
from typing import Any

from pd_runtime.compat import ResolvedPool

from . import labels
from .labels import Owner

TOKEN_KEY = "token"
VOLUME = "pd-side-channel-token"
# handshake.DEFAULT_TOKEN_FILE is MOUNT_DIR/TOKEN_KEY: the engines read it without a flag
MOUNT_DIR = "/var/run/secrets/pd-runtime"
COMPONENT = "side-channel-token"
# The token file is owned by this group and readable by it (0440): the pod's fsGroup, which the
# kubelet also adds to every container's supplementary groups, so the engine reads it whatever
# user the image runs as (the runtime image runs as 65532; a 0400 root-owned file refused it).
FS_GROUP = 65532


def name(owner: Owner) -> str:
    return labels.child_name(owner, COMPONENT)


def needed(*pools: ResolvedPool) -> bool:
    """Only the builtin engine speaks this side channel (vLLM's NIXL handshake has no token)."""
    return any(p.engine_type == "builtin" for p in pools)


def secret(owner: Owner, token: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": labels.metadata(owner, name(owner), COMPONENT),
        "type": "Opaque",
        "data": {TOKEN_KEY: base64.b64encode(token.encode()).decode()},
    }


def volume(owner: Owner) -> dict[str, Any]:
    return {"name": VOLUME,
            "secret": {"secretName": name(owner), "defaultMode": 0o440,
                       "items": [{"key": TOKEN_KEY, "path": TOKEN_KEY}]}}


def pod_security_context() -> dict[str, Any]:
    return {"fsGroup": FS_GROUP}


def volume_mount() -> dict[str, Any]:
    return {"name": VOLUME, "mountPath": MOUNT_DIR, "readOnly": True}
