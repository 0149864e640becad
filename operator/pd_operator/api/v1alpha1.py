"""PDDeployment v1alpha1: the source of truth for the CRD (crds/ is generated from here).

Field names follow the contract in DESIGN.md. Python attributes are snake_case; the JSON names
are camelCase aliases. Every field has a description, which becomes `kubectl explain` text.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from pd_runtime.compat.families import Family

from . import k8s

GROUP = "serving.pd-operator.dev"
VERSION = "v1alpha1"
KIND = "PDDeployment"
PLURAL = "pddeployments"
SHORT_NAME = "pdd"

# Bounds that make every admitted spec renderable and its admission cost bounded (issue 11).
# metadata.name: the longest child StatefulSet is <name>-prefill, and its pods carry the label
# controller-revision-hash=<statefulset>-<10-char hash>, which must fit in 63 characters; the
# headless Services' names must be DNS-1035 labels (a letter first, no dots).
MAX_STATEFULSET_NAME = 63 - 11
MAX_NAME_LENGTH = MAX_STATEFULSET_NAME - len("-prefill")
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
MAX_REPLICAS = 1000
MAX_ARGS = 128
MAX_ARG_LENGTH = 4096
MAX_STRING = 512  # model names, revisions, backends
MAX_IMAGE = 1024


def name_error(name: str) -> str | None:
    """Why a PDDeployment may not have this name (its children could not be created)."""
    if len(name) > MAX_NAME_LENGTH:
        return (f"metadata.name {name!r} has {len(name)} characters; at most "
                f"{MAX_NAME_LENGTH} fit the children's names (<name>-prefill plus the pod "
                "revision hash must be a valid 63-character label)")
    if not re.match(NAME_PATTERN, name):
        return (f"metadata.name {name!r} must be a DNS-1035 label (lowercase letters, digits "
                "and '-', starting with a letter): it names the pools' Services")
    return None

ModelDtype = Literal["float16", "bfloat16", "float32"]
KVCacheDtype = Literal[
    "auto", "float16", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2", "fp8_inc", "fp8_ds_mla",
    "nvfp4_ds_mla", "int8_per_token_head", "fp8_per_token_head", "int4_per_token_head",
    "nvfp4", "nvfp4_4over6",
]

_ALIASES = {
    "num_kv_heads": "numKVHeads",
    "enable_permute_local_kv": "enablePermuteLocalKV",
    "kv_lease_duration_seconds": "kvLeaseDurationSeconds",
    "hybrid_kv_cache_manager": "hybridKVCacheManager",
}


def _alias(name: str) -> str:
    return _ALIASES.get(name, to_camel(name))


class APIModel(BaseModel):
    model_config = ConfigDict(
        alias_generator=_alias, populate_by_name=True, extra="forbid", frozen=True
    )


class ModelSpec(APIModel):
    name: str = Field(
        min_length=1, max_length=MAX_STRING,
        description="The exact model string the engine is started with (hub id or path). "
        "It is hashed as a string: the same weights under another path do not match.",
    )
    family: Family = Field(description="Model architecture family; selects the rules.")
    dtype: ModelDtype = Field("bfloat16", description="Resolved model dtype.")
    num_kv_heads: int = Field(ge=1, description="Total KV heads as the engine counts them "
                              "(MLA: 1).")
    head_size: int = Field(ge=1, description="Head size as the engine counts it (MLA: "
                           "kv_lora_rank + qk_rope_head_dim).")
    num_hidden_layers: int = Field(ge=1, description="Total hidden layers.")
    sliding_window: int = Field(0, ge=0, description="> 0 when the model has sliding-window "
                                "layers (makes the hybrid KV cache manager mandatory).")
    revision: str | None = Field(None, max_length=MAX_STRING,
                                 description="Model revision (not hashed by vLLM; "
                                 "compared between the pools).")
    mamba_type: Literal["mamba1", "mamba2", "gdn", "short-conv", "linear"] | None = Field(
        None, description="Hybrid SSM only: the Mamba layer type.")


class ModelOverride(APIModel):
    """Per-pool override of spec.model: only the fields given replace the shared ones."""

    name: str | None = Field(None, min_length=1, max_length=MAX_STRING,
                             description="Overrides spec.model.name.")
    family: Family | None = Field(None, description="Overrides spec.model.family.")
    dtype: ModelDtype | None = Field(None, description="Overrides spec.model.dtype.")
    num_kv_heads: int | None = Field(None, ge=1, description="Overrides spec.model.numKVHeads.")
    head_size: int | None = Field(None, ge=1, description="Overrides spec.model.headSize.")
    num_hidden_layers: int | None = Field(None, ge=1,
                                          description="Overrides spec.model.numHiddenLayers.")
    sliding_window: int | None = Field(None, ge=0,
                                       description="Overrides spec.model.slidingWindow.")
    revision: str | None = Field(None, max_length=MAX_STRING,
                                 description="Overrides spec.model.revision.")
    mamba_type: Literal["mamba1", "mamba2", "gdn", "short-conv", "linear"] | None = Field(
        None, description="Overrides spec.model.mambaType.")


class EngineSpec(APIModel):
    type: Literal["vllm", "builtin"] = Field("vllm", description="vllm, or builtin (the "
                                             "bundled runtime).")
    image: str = Field(min_length=1, max_length=MAX_IMAGE,
                       description="Container image of the engine.")
    version: str | None = Field(None, max_length=64,
                                description="Engine version; optional when the image "
                                "tag carries it. Required for digest-only images.")


class EngineOverride(APIModel):
    type: Literal["vllm", "builtin"] | None = Field(None, description="Overrides spec.engine.type.")
    image: str | None = Field(None, min_length=1, max_length=MAX_IMAGE,
                              description="Overrides spec.engine.image.")
    version: str | None = Field(None, max_length=64, description="Overrides spec.engine.version.")


Backend = Literal["UCX", "LIBFABRIC", "GDS", "GDS_MT", "POSIX"]


def _default_backends() -> list[Backend]:
    return ["UCX"]


class KVTransferSpec(APIModel):
    connector: Literal["NixlConnector", "NixlPullConnector", "NixlPushConnector"] = Field(
        "NixlConnector", description="NixlConnector (pull, D reads) or NixlPushConnector "
        "(push, P writes).")
    backends: list[Backend] = Field(
        default_factory=_default_backends, min_length=1, max_length=5,
        description="NIXL transport backends.")
    buffer_device: Literal["cuda", "cpu"] = Field("cuda", description="Where the registered "
                                                  "KV lives: cuda, or cpu (host buffer).")
    enforce_handshake_compat: bool = Field(True, description="Check the compatibility hash "
                                           "at handshake (leave on).")
    enable_permute_local_kv: bool = Field(False, description="Decode permutes received HND "
                                          "blocks into NHD (experimental).")
    enable_cross_layers_blocks: bool = Field(False, description="vLLM 0.16-0.28 cross-layer "
                                             "KV blocks.")
    side_channel_port: int = Field(5600, ge=1024, le=65535, description="Base side-channel "
                                   "port; DP rank i uses base + i.")
    kv_load_failure_policy: Literal["fail", "recompute"] = Field(
        "fail", description="What decode does when a KV load fails.")
    kv_lease_duration_seconds: int | None = Field(None, ge=1, description="How long prefill "
                                                  "keeps finished blocks for decode (vLLM 0.22+).")


class KVTransferOverride(APIModel):
    """Per-pool override of spec.kvTransfer (for migrations; the rules compare both sides)."""

    connector: Literal["NixlConnector", "NixlPullConnector", "NixlPushConnector"] | None = None
    buffer_device: Literal["cuda", "cpu"] | None = None
    enforce_handshake_compat: bool | None = None
    enable_permute_local_kv: bool | None = None
    enable_cross_layers_blocks: bool | None = None
    kv_load_failure_policy: Literal["fail", "recompute"] | None = None
    kv_lease_duration_seconds: int | None = Field(None, ge=1)


class ValidationSpec(APIModel):
    policy: Literal["Strict", "Warn", "Disabled"] = Field(
        "Strict", description="Strict rejects incompatible pairs; Warn admits them with "
        "warnings; Disabled skips the checks (status says Validated=Unknown, "
        "ValidationDisabled). An administrator can forbid Warn and Disabled (operator flag "
        "--forbid-validation-policies, namespace label "
        "pd-operator.dev/forbid-validation-policies).")


class SpeculativeSpec(APIModel):
    method: Literal["eagle", "eagle3", "mtp", "dflash", "dspark", "draft_model", "ngram",
                    "suffix", "medusa", "mlp_speculator"] = Field(
        description="Speculative decoding method.")
    model: str | None = Field(None, max_length=MAX_STRING, description="Draft model.")
    num_speculative_tokens: int | None = Field(None, ge=1, le=64,
                                               description="Tokens proposed per step.")
    revision: str | None = Field(None, max_length=MAX_STRING,
                                 description="Draft model revision.")
    kv_cache_dtype: str | None = Field(None, max_length=64,
                                       description="Draft KV-cache dtype override.")


class PodTemplateSpec(APIModel):
    """Copied into the pool's StatefulSet; each field is checked as the Kubernetes type it
    becomes (api/k8s.py) and kept in that type's JSON form."""

    node_selector: k8s.NODE_SELECTOR_FIELD = Field(
        default_factory=dict, description="Pod nodeSelector (label keys and values).")
    tolerations: Annotated[list[dict[str, Any]], k8s.k8s_field(k8s.TolerationList)] = Field(
        default_factory=list, description="Pod tolerations (core/v1 Toleration).")
    resources: Annotated[dict[str, Any], k8s.k8s_field(k8s.ResourceRequirements)] = Field(
        default_factory=dict, description="Container resources: limits and requests "
        "(nvidia.com/gpu is set from TP x PP).")
    env: Annotated[list[dict[str, Any]], k8s.k8s_field(k8s.EnvList)] = Field(
        default_factory=list, description="Extra container environment variables (core/v1 "
        "EnvVar: name with value or valueFrom).")


class PoolSpec(APIModel):
    replicas: int = Field(1, ge=0, le=MAX_REPLICAS,
                          description="Number of engine instances in the pool.")
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="TP size per instance.")
    pipeline_parallel_size: int = Field(1, ge=1, le=16, description="PP size per instance.")
    data_parallel_size: int = Field(1, ge=1, le=64, description="DP size per instance.")
    decode_context_parallel_size: int = Field(1, ge=1, le=64, description="Decode context "
                                              "parallel size (MLA only).")
    block_size: int = Field(16, ge=1, le=1024, description="KV block size in tokens.")
    attention_backend: str = Field("auto", min_length=1, max_length=64,
                                   description="Attention backend "
                                   "(e.g. FLASH_ATTN, FLASHINFER), or auto.")
    kv_cache_dtype: KVCacheDtype = Field("auto", description="KV-cache dtype string, "
                                         "compared literally (fp8 != fp8_e4m3).")
    kv_cache_layout: Literal["HND", "NHD"] | None = Field(
        None, description="KV layout; defaults to HND (the NixlConnector preference).")
    kv_cache_scales: Literal["static", "dynamic", "packed"] = Field(
        "static", description="How quantized-KV scales are obtained.")
    hybrid_kv_cache_manager: bool = Field(True, description="vLLM hybrid KV cache manager "
                                          "(hashed from 0.18).")
    prefix_caching: bool = Field(True, description="Automatic prefix caching.")
    speculative: SpeculativeSpec | None = Field(None, description="Speculative decoding.")
    engine: EngineOverride | None = Field(None, description="Per-pool override of spec.engine.")
    model: ModelOverride | None = Field(None, description="Per-pool override of spec.model.")
    kv_transfer: KVTransferOverride | None = Field(None, description="Per-pool override of "
                                                   "spec.kvTransfer.")
    template: PodTemplateSpec = Field(default_factory=PodTemplateSpec,
                                      description="Pod scheduling and environment.")
    args: list[Annotated[str, Field(max_length=MAX_ARG_LENGTH)]] = Field(
        default_factory=list, max_length=MAX_ARGS, description="Extra engine arguments.")


class RouterSpec(APIModel):
    replicas: int = Field(1, ge=0, le=MAX_REPLICAS, description="Router replicas.")
    policy: Literal["round_robin", "random", "consistent_hash", "power_of_two",
                    "cache_aware"] = Field("round_robin", description="Routing policy.")
    image: str | None = Field(None, min_length=1, max_length=MAX_IMAGE,
                              description="Router image (defaults to the operator's).")
    # Where the router pods run: the same core/v1 types (and checks) as a pool's template, so
    # the router can follow the pools onto dedicated (tainted) nodes.
    node_selector: k8s.NODE_SELECTOR_FIELD = Field(
        default_factory=dict, description="Router pod nodeSelector (label keys and values).")
    tolerations: Annotated[list[dict[str, Any]], k8s.k8s_field(k8s.TolerationList)] = Field(
        default_factory=list, description="Router pod tolerations (core/v1 Toleration).")
    resources: Annotated[dict[str, Any], k8s.k8s_field(k8s.ResourceRequirements)] = Field(
        default_factory=dict, description="Router container resources: limits and requests.")


class PDDeploymentSpec(APIModel):
    model: ModelSpec = Field(description="The model both pools serve.")
    engine: EngineSpec = Field(description="The engine both pools run.")
    kv_transfer: KVTransferSpec = Field(default_factory=KVTransferSpec,
                                        description="KV transfer between the pools.")
    validation: ValidationSpec = Field(default_factory=ValidationSpec,
                                       description="Admission validation policy.")
    prefill: PoolSpec = Field(description="The prefill pool.")
    decode: PoolSpec = Field(description="The decode pool.")
    router: RouterSpec = Field(default_factory=RouterSpec, description="The P/D router.")


class Verdict(APIModel):
    rule: str
    severity: Literal["reject", "warn"]
    fields: list[str] = Field(default_factory=list)
    message: str
    fix: str
    source: str | None = None


class CompatibilityStatus(APIModel):
    prefill_hash: str | None = Field(None, description="Predicted engine compatibility hash.")
    decode_hash: str | None = None
    verdicts: list[Verdict] = Field(default_factory=list)


class PoolStatus(APIModel):
    replicas: int = 0
    ready_replicas: int = 0


class Condition(APIModel):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str | None = None
    message: str | None = None
    last_transition_time: str | None = None
    observed_generation: int | None = None


class PDDeploymentStatus(APIModel):
    observed_generation: int | None = None
    phase: Literal["Pending", "Progressing", "Ready", "Degraded"] | None = None
    compatibility: CompatibilityStatus | None = None
    prefill: PoolStatus | None = None
    decode: PoolStatus | None = None
    router: PoolStatus | None = None
    conditions: list[Condition] = Field(default_factory=list)


class PDDeployment(BaseModel):
    """A whole object as read from YAML (metadata is kept loose, as the API server owns it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    apiVersion: Literal["serving.pd-operator.dev/v1alpha1"]
    kind: Literal["PDDeployment"]
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: PDDeploymentSpec
    status: PDDeploymentStatus | None = None
