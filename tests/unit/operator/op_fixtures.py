"""Small PDDeployment fixtures for the operator unit tests (independent of deploy/examples)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from tests.helpers import EXAMPLES, LLAMA_8B, REPO, sample_pdd

__all__ = ["BASE", "EXAMPLES", "REPO", "examples", "load", "obj"]

BASE: dict[str, Any] = sample_pdd(
    name="demo", namespace="ns1", model={**LLAMA_8B, "dtype": "bfloat16"},
    engine={"type": "vllm"}, prefill={"replicas": 1, "tensorParallelSize": 2},
    decode={"replicas": 2, "tensorParallelSize": 2})


def obj(**spec_overrides: Any) -> dict[str, Any]:
    """BASE with spec keys replaced; nested dicts by a dotted key: {"prefill.blockSize": 32}."""
    out = copy.deepcopy(BASE)
    for key, value in spec_overrides.items():
        node = out["spec"]
        parts = key.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def examples(kind: str) -> list[Path]:
    return sorted((EXAMPLES / kind).glob("*.yaml"))


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())
