"""Resolve a PDDeployment spec into two fully explicit pools (pure).

Per-pool overrides (`spec.<pool>.model`, `.engine`, `.kvTransfer`) replace the shared values field
by field; defaults fill the rest. Each resolved value remembers the JSON path it came from, so a
verdict can name the field the user has to change.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from pd_runtime.compat import ResolvedPool, Speculative
from pd_runtime.compat.versions import version_from_image

from .api.v1alpha1 import PDDeploymentSpec, PoolSpec, _alias

DEFAULT_LAYOUT = "HND"  # NixlConnector's preferred layout for non-MLA models
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"


@cache
def _json_name(attr: str) -> str:
    return _alias(attr)


def _engine(spec: PDDeploymentSpec, pool: PoolSpec, role: str, origin: dict[str, str]):
    over = pool.engine
    base = f"spec.{role}.engine" if over else "spec.engine"
    etype = over.type if over and over.type else spec.engine.type
    origin["engine_type"] = f"{base}.type" if over and over.type else "spec.engine.type"
    if over and over.image:
        image, image_path = over.image, f"spec.{role}.engine.image"
        version = over.version or version_from_image(over.image)
        version_path = f"spec.{role}.engine.version" if over.version else image_path
    else:
        image, image_path = spec.engine.image, "spec.engine.image"
        if over and over.version:
            version, version_path = over.version, f"spec.{role}.engine.version"
        elif spec.engine.version:
            version, version_path = spec.engine.version, "spec.engine.version"
        else:
            version, version_path = version_from_image(image), image_path
    origin["engine_image"] = image_path
    origin["engine_version"] = version_path
    return etype, image, version


def _env(pool: PoolSpec) -> dict[str, str]:
    """Literal env values by name; a valueFrom entry counts as set, with an empty value."""
    return {e["name"]: str(e.get("value", "")) for e in pool.template.env if "name" in e}


_POOL_FIELDS = {"tp": "tensor_parallel_size", "pp": "pipeline_parallel_size",
                "dp": "data_parallel_size", "dcp": "decode_context_parallel_size",
                "hma": "hybrid_kv_cache_manager"}
_POOL_FIELDS.update((n, n) for n in (
    "block_size", "attention_backend", "kv_cache_dtype", "kv_cache_layout", "kv_cache_scales",
    "prefix_caching", "speculative", "args", "replicas"))


# Values a pool may override field by field: resolved name -> attribute of the block.
_MODEL_FIELDS = {"model_name": "name", "model_revision": "revision", "family": "family",
                 "dtype": "dtype", "num_kv_heads": "num_kv_heads", "head_size": "head_size",
                 "num_hidden_layers": "num_hidden_layers", "sliding_window": "sliding_window",
                 "mamba_type": "mamba_type"}
_TRANSFER_FIELDS = {"connector": "connector", "buffer_device": "buffer_device",
                    "enforce_handshake_compat": "enforce_handshake_compat",
                    "enable_permute_local_kv": "enable_permute_local_kv",
                    "enable_cross_layers_blocks": "enable_cross_layers_blocks",
                    "kv_load_failure_policy": "kv_load_failure_policy",
                    "kv_lease_duration_s": "kv_lease_duration_seconds"}
_OVERRIDABLE = (("model", "spec.model", _MODEL_FIELDS),
                ("kvTransfer", "spec.kvTransfer", _TRANSFER_FIELDS))


@cache
def _default_paths(role: str) -> dict[str, str]:
    """JSON path of every value when the pool overrides nothing (computed once per role)."""
    paths = {name: f"spec.{role}.{_json_name(attr)}" for name, attr in _POOL_FIELDS.items()}
    paths.update(env=f"spec.{role}.template.env", gpu_product=f"spec.{role}.template.nodeSelector",
                 backends="spec.kvTransfer.backends",
                 side_channel_port="spec.kvTransfer.sideChannelPort")
    for _, shared, fields in _OVERRIDABLE:
        paths.update((name, f"{shared}.{_json_name(attr)}") for name, attr in fields.items())
    return paths


def _merge(shared: Any, override: Any, fields: dict[str, str], block_path: str,
           origin: dict[str, str]) -> dict[str, Any]:
    """Each field from the override when it sets it, else from the shared block; `origin`
    learns the path of each overridden field."""
    if override is None:
        return {name: getattr(shared, attr) for name, attr in fields.items()}
    out = {}
    for name, attr in fields.items():
        value = getattr(override, attr)
        if value is None:
            value = getattr(shared, attr)
        else:
            origin[name] = f"{block_path}.{_json_name(attr)}"
        out[name] = value
    return out


def resolve_pool(spec: PDDeploymentSpec, role: str) -> ResolvedPool:
    pool: PoolSpec = getattr(spec, role)
    origin: dict[str, str] = dict(_default_paths(role))
    model = _merge(spec.model, pool.model, _MODEL_FIELDS, f"spec.{role}.model", origin)
    transfer = _merge(spec.kv_transfer, pool.kv_transfer, _TRANSFER_FIELDS,
                      f"spec.{role}.kvTransfer", origin)
    engine_type, engine_image, engine_version = _engine(spec, pool, role, origin)
    spec_block = pool.speculative
    return ResolvedPool(
        role=role,
        engine_type=engine_type,
        engine_image=engine_image,
        engine_version=engine_version,
        **model,
        tp=pool.tensor_parallel_size,
        pp=pool.pipeline_parallel_size,
        dp=pool.data_parallel_size,
        dcp=pool.decode_context_parallel_size,
        block_size=pool.block_size,
        attention_backend=pool.attention_backend,
        kv_cache_dtype=pool.kv_cache_dtype,
        kv_cache_layout=pool.kv_cache_layout or DEFAULT_LAYOUT,
        kv_cache_scales=pool.kv_cache_scales,
        hma=pool.hybrid_kv_cache_manager,
        prefix_caching=pool.prefix_caching,
        speculative=Speculative(
            method=spec_block.method, model=spec_block.model,
            num_speculative_tokens=spec_block.num_speculative_tokens,
            revision=spec_block.revision, kv_cache_dtype=spec_block.kv_cache_dtype,
        ) if spec_block else None,
        **transfer,
        backends=tuple(spec.kv_transfer.backends),
        side_channel_port=spec.kv_transfer.side_channel_port,
        replicas=pool.replicas,
        gpu_product=pool.template.node_selector.get(GPU_PRODUCT_LABEL),
        args=tuple(pool.args),
        env=_env(pool),
        origin=origin,
    )


def resolve(spec: PDDeploymentSpec) -> tuple[ResolvedPool, ResolvedPool]:
    """The prefill and decode pools, every value explicit."""
    return resolve_pool(spec, "prefill"), resolve_pool(spec, "decode")
