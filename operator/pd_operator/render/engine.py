"""The engine command line and environment of one pool (pure).

Input is the ResolvedPool (every value explicit, see resolve.py); output is the container's
`command` and the managed `env` entries. Comments name the spec field each flag comes from.
"""

from __future__ import annotations

import json
from typing import Any

from pd_runtime.compat import ENGINE_HTTP_PORT, ResolvedPool
from pd_runtime.compat.rules_known_bugs import OPERATOR_KV_LEASE_S
from pd_runtime.compat.versions import parse_version

CONFIG_MOUNT = "/etc/pd-operator"  # where the ConfigMap with the rendered config is mounted
SIDE_CHANNEL_HOST_ENV = "VLLM_NIXL_SIDE_CHANNEL_HOST"
SIDE_CHANNEL_PORT_ENV = "VLLM_NIXL_SIDE_CHANNEL_PORT"

KV_ROLE = {"prefill": "kv_producer", "decode": "kv_consumer"}


def _minor(pool: ResolvedPool) -> tuple[int, int] | None:
    v = parse_version(pool.engine_version) if pool.engine_version else None
    return v.minor if v else None


def kv_transfer_config(pool: ResolvedPool) -> dict[str, Any]:
    """vLLM's KVTransferConfig for this pool (vllm-nixl-rules.md §8).

    KVTransferConfig forbids unknown fields, so fields a version does not know are left out:
    `kv_load_failure_policy` before 0.13, `kv_lease_duration` before 0.22, `enable_permute_local_kv`
    unless it is on. An unknown version is treated as the newest.
    """
    minor = _minor(pool) or (99, 0)
    extra: dict[str, Any] = {
        "backends": list(pool.backends),  # spec.kvTransfer.backends
        "enforce_handshake_compat": pool.enforce_handshake_compat,  # ...enforceHandshakeCompat
    }
    if minor >= (0, 22):  # ...kvLeaseDurationSeconds; unset: longer than vLLM's 30 s
        extra["kv_lease_duration"] = pool.kv_lease_duration_s or OPERATOR_KV_LEASE_S
    if pool.enable_cross_layers_blocks and (0, 16) <= minor <= (0, 28):
        extra["enable_cross_layers_blocks"] = True  # ...enableCrossLayersBlocks
    cfg: dict[str, Any] = {
        "kv_connector": pool.connector,  # spec.kvTransfer.connector
        "kv_role": KV_ROLE[pool.role],  # the pool: prefill produces, decode consumes
        "kv_buffer_device": pool.buffer_device,  # spec.kvTransfer.bufferDevice
        "kv_connector_extra_config": extra,
    }
    if minor >= (0, 13):
        cfg["kv_load_failure_policy"] = pool.kv_load_failure_policy
    if pool.enable_permute_local_kv:
        cfg["enable_permute_local_kv"] = True  # spec.kvTransfer.enablePermuteLocalKV
    return cfg


def _speculative_config(pool: ResolvedPool) -> dict[str, Any] | None:
    s = pool.speculative
    if s is None:
        return None
    out: dict[str, Any] = {"method": s.method}
    if s.model:
        out["model"] = s.model
    if s.num_speculative_tokens:
        out["num_speculative_tokens"] = s.num_speculative_tokens
    if s.revision:
        out["revision"] = s.revision
    if s.kv_cache_dtype:
        out["kv_cache_dtype"] = s.kv_cache_dtype
    return out


def vllm_command(pool: ResolvedPool) -> list[str]:
    cmd = [
        "vllm", "serve",
        "--model", pool.model_name,  # spec.model.name (hashed as a string)
        "--port", str(ENGINE_HTTP_PORT),
        "--dtype", pool.dtype,  # spec.model.dtype
        "--tensor-parallel-size", str(pool.tp),  # spec.<pool>.tensorParallelSize
        "--pipeline-parallel-size", str(pool.pp),  # spec.<pool>.pipelineParallelSize
        "--block-size", str(pool.block_size),  # spec.<pool>.blockSize
        "--kv-cache-dtype", pool.kv_cache_dtype,  # spec.<pool>.kvCacheDtype
    ]
    if pool.dp > 1:
        cmd += ["--data-parallel-size", str(pool.dp)]  # spec.<pool>.dataParallelSize
    if pool.dcp > 1:
        cmd += ["--decode-context-parallel-size", str(pool.dcp)]
    if pool.attention_backend != "auto":
        cmd += ["--attention-backend", pool.attention_backend]  # spec.<pool>.attentionBackend
    if pool.model_revision:
        cmd += ["--revision", pool.model_revision]  # spec.model.revision
    if not pool.hma:
        cmd.append("--disable-hybrid-kv-cache-manager")  # spec.<pool>.hybridKVCacheManager
    if not pool.prefix_caching:
        cmd.append("--no-enable-prefix-caching")  # spec.<pool>.prefixCaching
    spec_cfg = _speculative_config(pool)
    if spec_cfg:
        cmd += ["--speculative-config", json.dumps(spec_cfg, sort_keys=True)]
    cmd += ["--kv-transfer-config", json.dumps(kv_transfer_config(pool), sort_keys=True)]
    return cmd + list(pool.args)  # spec.<pool>.args, last


def builtin_command(pool: ResolvedPool) -> list[str]:
    """The bundled runtime's `pd-runtime serve` with the pool geometry (the runtime owns the
    parser; these are the arguments the operator promises to pass)."""
    cmd = [
        "pd-runtime", "serve",
        "--role", pool.role,
        "--model", pool.model_name,
        "--family", pool.family,
        "--dtype", pool.dtype,
        "--num-kv-heads", str(pool.num_kv_heads),
        "--head-size", str(pool.head_size),
        "--num-layers", str(pool.num_hidden_layers),
        "--tensor-parallel-size", str(pool.tp),
        "--pipeline-parallel-size", str(pool.pp),
        "--data-parallel-size", str(pool.dp),
        "--block-size", str(pool.block_size),
        "--kv-cache-dtype", pool.kv_cache_dtype,
        "--kv-cache-layout", pool.kv_cache_layout,
        "--connector", pool.connector,
        "--backends", ",".join(pool.backends),
        "--buffer-device", pool.buffer_device,
        "--port", str(ENGINE_HTTP_PORT),
        "--side-channel-port", str(pool.side_channel_port),
        "--config", f"{CONFIG_MOUNT}/{pool.role}.json",
    ]
    return cmd + list(pool.args)


def command(pool: ResolvedPool) -> list[str]:
    return builtin_command(pool) if pool.engine_type == "builtin" else vllm_command(pool)


def managed_env(pool: ResolvedPool) -> list[dict[str, Any]]:
    """The environment the operator sets; spec.<pool>.template.env entries of the same name win
    (the rules judge those values, e.g. VLLM_SSM_CONV_STATE_LAYOUT)."""
    env: list[dict[str, Any]] = [
        # Bound on the pod and advertised to peers: must be the pod IP (vllm-nixl-rules.md §2.2).
        {"name": SIDE_CHANNEL_HOST_ENV,
         "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.podIP"}}},
        # Base port; DP rank i listens on base + i.
        {"name": SIDE_CHANNEL_PORT_ENV, "value": str(pool.side_channel_port)},
        {"name": "VLLM_KV_CACHE_LAYOUT", "value": pool.kv_cache_layout},  # .kvCacheLayout
    ]
    if pool.is_hybrid_ssm:
        env.append({"name": "VLLM_SSM_CONV_STATE_LAYOUT", "value": "DS"})  # §3.5
    return env


def env(pool: ResolvedPool, user_env: list[dict[str, Any]]) -> list[dict[str, Any]]:
    user_names = {e.get("name") for e in user_env}
    out = [e for e in managed_env(pool) if e["name"] not in user_names]
    seen: set[str | None] = set()
    for e in user_env:  # duplicates would break the list's merge key: keep the last one
        if e.get("name") in seen:
            out = [x for x in out if x.get("name") != e.get("name")]
        seen.add(e.get("name"))
        out.append(dict(e))
    return out
