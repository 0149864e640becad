"""Checks `pd-runtime serve` runs before it binds a port or loads weights (pure where possible).

Each problem names the PDDeployment field and the flag it arrived as, what the pod actually has,
and what would fix it: a pod that would serve the wrong geometry, or could never hand its KV
over, stops here instead of failing a request later.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# spec.model.family values the engine serves (a sliding-window model is `dense` with
# spec.model.slidingWindow > 0; its checkpoint family is `sliding`).
SERVED_FAMILIES = {"dense": {"dense", "sliding"}, "moe": {"moe"}, "mla": {"mla"},
                   "hybrid-ssm": {"hybrid-ssm"}}
TOKEN_ENV, TOKEN_FILE_ENV = "PD_RUNTIME_TOKEN", "PD_RUNTIME_TOKEN_FILE"
DEFAULT_TOKEN_FILE = "/var/run/secrets/pd-runtime/token"  # the Secret's mount (handshake.py)


class PreflightError(Exception):
    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Declared:
    """The model facts and parallelism the operator rendered (spec.model, spec.<pool>)."""

    family: str
    dtype: str
    num_kv_heads: int
    head_size: int
    num_layers: int
    tp: int
    pp: int
    dp: int


def _field(spec: str, flag: str, value: Any) -> str:
    return f"{spec} ({flag} {value})"


def check_model(d: Declared, cfg: Any, *, source: str, is_gguf: bool) -> list[str]:
    """The checkpoint's config (engine.config.ModelConfig) against the declared facts."""
    problems = []
    if d.family not in SERVED_FAMILIES:
        problems.append(f"{_field('spec.model.family', '--family', d.family)}: the builtin "
                        f"engine serves {', '.join(SERVED_FAMILIES)}; use engine.type: vllm")
    elif cfg.family not in SERVED_FAMILIES[d.family]:
        problems.append(f"{_field('spec.model.family', '--family', d.family)} but the "
                        f"checkpoint {source} is a {cfg.family} model")
    pairs = [("spec.model.numKVHeads", "--num-kv-heads", d.num_kv_heads, cfg.num_kv_heads,
              "KV heads"),
             ("spec.model.headSize", "--head-size", d.head_size, cfg.head_size, "head size"),
             ("spec.model.numHiddenLayers", "--num-layers", d.num_layers, cfg.num_layers,
              "layers")]
    for spec, flag, want, have, what in pairs:
        if want != have:
            problems.append(f"{_field(spec, flag, want)} but the checkpoint {source} has "
                            f"{what} {have}")
    # A GGUF is quantized and dequantized at load: any declared dtype is what it loads as.
    if not is_gguf and d.dtype != cfg.dtype:
        problems.append(f"{_field('spec.model.dtype', '--dtype', d.dtype)} but the checkpoint "
                        f"{source} is {cfg.dtype}")
    return problems


def check_devices(d: Declared, device: str, cuda_devices: int) -> list[str]:
    problems = []
    if d.pp != 1:
        problems.append(f"{_field('spec.<pool>.pipelineParallelSize', '--pipeline-parallel-size', d.pp)}: the builtin engine runs pipeline parallel size 1")  # noqa: E501
    if d.dp != 1:
        problems.append(f"{_field('spec.<pool>.dataParallelSize', '--data-parallel-size', d.dp)}: the builtin engine runs one data-parallel rank per pod; scale with replicas")  # noqa: E501
    if d.num_kv_heads % d.tp and d.tp % d.num_kv_heads:
        problems.append(f"{_field('spec.<pool>.tensorParallelSize', '--tensor-parallel-size', d.tp)} and {d.num_kv_heads} KV heads: one must divide the other")  # noqa: E501
    need = d.tp * d.pp * d.dp
    if device == "cuda" and cuda_devices < need:
        problems.append(
            f"spec.<pool>.tensorParallelSize x pipelineParallelSize x dataParallelSize = {need} "
            f"GPUs, but this pod sees {cuda_devices} (resources.limits nvidia.com/gpu, "
            "CUDA_VISIBLE_DEVICES)")
    return problems


def mounted(path: str) -> str:
    """A pod path under the local profile's mount root (pdctl run lays the pod's volumes out
    there); unchanged in a pod."""
    root = os.environ.get("PD_RUNTIME_MOUNT_ROOT")
    if root and os.path.isabs(path):
        return os.path.join(root, path.lstrip("/"))
    return path


def token_source(explicit: str | None) -> tuple[str, str | None]:
    """(where the token comes from, the file path or None when it is the env value)."""
    if explicit:
        return f"--side-channel-token-file {explicit}", explicit
    if os.environ.get(TOKEN_ENV):
        return f"${TOKEN_ENV}", None
    if os.environ.get(TOKEN_FILE_ENV):
        path = os.environ[TOKEN_FILE_ENV]
        return f"${TOKEN_FILE_ENV} {path}", path
    path = mounted(DEFAULT_TOKEN_FILE)
    return f"the Secret mount {DEFAULT_TOKEN_FILE}", path


def check_token(role: str, explicit: str | None) -> tuple[list[str], str | None]:
    """(problems, token file path). P and D authenticate their side channel with a shared
    token; without one a pool could neither serve nor pull KV."""
    if role == "aggregated":
        return [], None
    where, path = token_source(explicit)
    if path is None:
        return [], None
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return [f"side-channel token: {where} is not readable ({exc.strerror}); the operator "
                "mounts the Secret <name>-side-channel-token there"], None
    if not data.strip():
        return [f"side-channel token: {where} is empty"], None
    return [], path


def read_pool_document(path: str) -> tuple[dict[str, Any] | None, list[str]]:
    """The rendered pool (ConfigMap prefill.json / decode.json), when mounted."""
    real = mounted(path)
    try:
        with open(real, encoding="utf-8") as fh:
            doc = json.load(fh)
    except FileNotFoundError:
        return None, [f"--config {path}: no such file (the pool's ConfigMap is not mounted)"]
    except (OSError, json.JSONDecodeError) as exc:
        return None, [f"--config {path}: unreadable ({exc})"]
    if not isinstance(doc, dict):
        return None, [f"--config {path}: not a JSON object"]
    return doc, []


def check_pool_document(doc: dict[str, Any], role: str, d: Declared) -> list[str]:
    """The mounted ConfigMap must describe this pool: a stale mount would mean the pods run a
    geometry the admission check never saw."""
    problems = []
    want = {"role": role, "family": d.family, "dtype": d.dtype, "num_kv_heads": d.num_kv_heads,
            "head_size": d.head_size, "num_hidden_layers": d.num_layers, "tp": d.tp}
    for key, value in want.items():
        if key in doc and doc[key] != value:
            problems.append(f"--config: {key} is {doc[key]!r} there but {value!r} on the "
                            "command line (a stale ConfigMap?)")
    return problems
