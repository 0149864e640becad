"""Small PDDeployment fixtures for the operator unit tests (independent of deploy/examples)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = REPO / "deploy" / "examples"

BASE: dict[str, Any] = {
    "apiVersion": "serving.pd-operator.dev/v1alpha1",
    "kind": "PDDeployment",
    "metadata": {"name": "demo", "namespace": "ns1"},
    "spec": {
        "model": {"name": "meta-llama/Llama-3.1-8B-Instruct", "family": "dense",
                  "dtype": "bfloat16", "numKVHeads": 8, "headSize": 128,
                  "numHiddenLayers": 32},
        "engine": {"type": "vllm", "image": "vllm/vllm-openai:v0.33.0"},
        "prefill": {"replicas": 1, "tensorParallelSize": 2, "attentionBackend": "FLASH_ATTN"},
        "decode": {"replicas": 2, "tensorParallelSize": 2, "attentionBackend": "FLASH_ATTN"},
    },
}


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
