"""Model facts from a Hugging Face config.json: what the engine computes and what the KV looks like.

`ModelConfig.from_hf` reads Llama / Mistral / Qwen2 / Qwen3 (dense), Mixtral / Qwen2-MoE (MoE),
DeepSeek-V2 (MLA, dense or MoE MLP) configs. `model_spec` gives the KV geometry the transfer
engine moves (`kvcache.ModelSpec`), so the engine and the transfer engine never disagree on bytes.

Sliding windows: the transfer engine's geometry (kvcache.py) knows one sliding pattern, odd layers
sliding in their own KV-cache group (family "sliding"). A config whose sliding layers are exactly
the odd layers gets that family. Any other pattern (Mistral v0.1: every layer sliding) keeps its
family (dense / moe) and its full KV group: the window is applied as an attention mask only, and
every block stays live (correct, just not memory-saving).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .. import kvcache

DTYPES = ("bfloat16", "float16", "float32")


class ConfigError(ValueError):
    """A config.json the engine cannot run; the message names the field."""


@dataclass(frozen=True)
class ModelConfig:
    family: str  # dense | moe | mla | sliding | hybrid-ssm   (kvcache.FAMILIES)
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position: int
    tie_word_embeddings: bool
    dtype: str  # bfloat16 | float16 | float32
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    sliding_window: int = 0
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    q_lora_rank: int | None = None
    # hybrid-ssm (names as kvcache.ModelSpec has them); not computed by this engine yet
    ssm_heads: int = 0
    ssm_head_dim: int = 0
    ssm_groups: int = 0
    d_state: int = 0
    conv_kernel: int = 0
    # beyond the plan's fields: what the compute needs
    model_type: str = "llama"
    sliding_layers: tuple[int, ...] = ()  # layers whose attention is windowed
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3)
    rope_scaling: tuple[tuple[str, Any], ...] = ()  # sorted items of config.rope_scaling
    moe_layers: tuple[int, ...] = ()  # layers with a routed-expert MLP
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE shared expert (gated), DeepSeek shared
    shared_expert_gated: bool = False
    partial_rotary_factor: float = 1.0  # rope on the first head_size * factor dims (Bamba: 0.5)
    time_step_limit: tuple[float, float] = (0.0, float("inf"))  # Mamba-2 dt clamp
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def rope_dim(self) -> int:
        if self.family == "mla":
            return self.qk_rope_head_dim
        return int(self.head_size * self.partial_rotary_factor)

    def is_ssm_layer(self, layer: int) -> bool:
        """hybrid-ssm: odd layers are Mamba-2 layers (kvcache.py's pattern)."""
        return self.family == "hybrid-ssm" and layer % 2 == 1

    @property
    def torch_dtype(self) -> Any:
        import torch

        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[
            self.dtype
        ]

    def with_dtype(self, dtype: str | None) -> ModelConfig:
        if dtype is None or dtype == self.dtype:
            return self
        if dtype not in DTYPES:
            raise ConfigError(f"dtype {dtype!r} not supported ({', '.join(DTYPES)})")
        from dataclasses import replace

        return replace(self, dtype=dtype)

    def model_spec(self, cache_dtype: str = "auto") -> kvcache.ModelSpec:
        """The KV geometry the transfer engine uses for this model."""
        return kvcache.ModelSpec(
            family=self.family,
            num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads,
            head_size=self.head_size,
            dtype=self.dtype,
            cache_dtype=cache_dtype,
            kv_lora_rank=self.kv_lora_rank or 512,
            rope_dim=self.qk_rope_head_dim or 64,
            sliding_window=self.sliding_window if self.family == "sliding" else 0,
            ssm_heads=self.ssm_heads or 8,
            ssm_head_dim=self.ssm_head_dim or 64,
            ssm_groups=self.ssm_groups or 1,
            d_state=self.d_state or 16,
            conv_kernel=self.conv_kernel or 4,
        )

    def window_of(self, layer: int) -> int:
        """Attention window of `layer` (0: full attention)."""
        return self.sliding_window if layer in self.sliding_layers else 0

    def kv_group_of(self, layer: int) -> int:
        if self.is_ssm_layer(layer):
            return kvcache.GROUP_STATE
        if self.family == "sliding" and layer % 2 == 1:
            return kvcache.GROUP_SLIDING
        return kvcache.GROUP_FULL

    @staticmethod
    def from_hf(cfg: dict) -> ModelConfig:
        return _from_hf(cfg)


def _req(cfg: dict, key: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise ConfigError(f"config.json: missing field {key!r}")
    return cfg[key]


def _dtype_of(cfg: dict) -> str:
    d = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    d = str(d).replace("torch.", "")
    if d not in DTYPES:
        raise ConfigError(f"config.json: dtype {d!r} not supported ({', '.join(DTYPES)})")
    return d


def _eos_of(cfg: dict) -> tuple[int, ...]:
    e = cfg.get("eos_token_id")
    if e is None:
        return ()
    return tuple(int(x) for x in e) if isinstance(e, list) else (int(e),)


DENSE_TYPES = ("llama", "mistral", "qwen2", "qwen3", "ministral")
MOE_TYPES = ("mixtral", "qwen2_moe")
MLA_TYPES = ("deepseek_v2",)
HYBRID_TYPES = ("bamba",)


def _sliding_layers(cfg: dict, num_layers: int) -> tuple[int, tuple[int, ...]]:
    """(window, layers with that window) from sliding_window / use_sliding_window / layer_types."""
    window = cfg.get("sliding_window")
    if not window:
        return 0, ()
    window = int(window)
    if cfg.get("use_sliding_window") is False:
        return 0, ()
    types = cfg.get("layer_types")
    if types:
        if len(types) != num_layers:
            raise ConfigError("config.json: layer_types must have one entry per layer")
        return window, tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    if cfg.get("model_type") == "qwen2" or cfg.get("model_type") == "qwen2_moe":
        first = int(cfg.get("max_window_layers", num_layers))
        return window, tuple(range(first, num_layers))
    return window, tuple(range(num_layers))


def _from_hf(cfg: dict) -> ModelConfig:
    mt = cfg.get("model_type", "llama")
    known = DENSE_TYPES + MOE_TYPES + MLA_TYPES + HYBRID_TYPES
    if mt not in known:
        raise ConfigError(f"config.json: model_type {mt!r} not supported ({', '.join(known)})")
    layers = int(_req(cfg, "num_hidden_layers"))
    heads = int(_req(cfg, "num_attention_heads"))
    hidden = int(_req(cfg, "hidden_size"))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_size = int(cfg.get("head_dim") or hidden // heads)
    rope = cfg.get("rope_parameters") or {}
    rope_theta = float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0)
    scaling = cfg.get("rope_scaling") or {
        k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")
    }
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) not in (
        "default",
        "llama3",
    ):
        raise ConfigError(f"config.json: rope_scaling {scaling!r} not supported (default, llama3)")
    if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = {}
    window, sliding = _sliding_layers(cfg, layers)
    family = "dense"
    if window and sliding == tuple(range(1, layers, 2)):
        family = "sliding"
    kw: dict[str, Any] = {}
    if mt in MOE_TYPES:
        family = "moe" if family == "dense" else family
        kw = _moe_fields(cfg, mt, layers)
    if mt in HYBRID_TYPES:
        family = "hybrid-ssm"
        kw = _hybrid_fields(cfg, layers)
    if mt in MLA_TYPES:
        family = "mla"
        kw = _mla_fields(cfg, layers)
        # vLLM's KV geometry for MLA (what spec.model declares): one latent "head" of
        # kv_lora_rank + qk_rope_head_dim per token; the per-head q/k/v sizes are their own fields
        head_size = kw.pop("head_size")
        kv_heads = 1
    return ModelConfig(
        family=family,
        vocab_size=int(_req(cfg, "vocab_size")),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_size=head_size,
        intermediate_size=int(cfg.get("intermediate_size") or 0),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        max_position=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        dtype=_dtype_of(cfg),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_of(cfg),
        sliding_window=window,
        sliding_layers=sliding,
        model_type=mt,
        attention_bias=bool(cfg.get("attention_bias", mt in ("qwen2", "qwen2_moe"))),
        qk_norm=mt == "qwen3",
        rope_scaling=tuple(sorted(scaling.items())),
        partial_rotary_factor=float(
            cfg.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 1.0
        ),
        **kw,
    )


def _moe_fields(cfg: dict, mt: str, layers: int) -> dict[str, Any]:
    if mt == "mixtral":
        n = int(_req(cfg, "num_local_experts"))
        return dict(
            num_experts=n,
            num_experts_per_tok=int(_req(cfg, "num_experts_per_tok")),
            moe_intermediate_size=int(_req(cfg, "intermediate_size")),
            moe_layers=tuple(range(layers)),
            norm_topk_prob=True,
        )
    step = int(cfg.get("decoder_sparse_step", 1))
    dense_only = set(cfg.get("mlp_only_layers") or [])
    moe = tuple(i for i in range(layers) if i not in dense_only and (i + 1) % step == 0)
    return dict(
        num_experts=int(_req(cfg, "num_experts")),
        num_experts_per_tok=int(_req(cfg, "num_experts_per_tok")),
        moe_intermediate_size=int(_req(cfg, "moe_intermediate_size")),
        moe_layers=moe,
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size") or 0),
        shared_expert_gated=True,
    )


def _mla_fields(cfg: dict, layers: int) -> dict[str, Any]:
    if cfg.get("topk_method", "greedy") != "greedy":
        raise ConfigError(
            f"config.json: topk_method {cfg.get('topk_method')!r} not supported (greedy)"
        )
    if cfg.get("scoring_func", "softmax") != "softmax":
        raise ConfigError("config.json: scoring_func must be softmax")
    n_routed = int(cfg.get("n_routed_experts") or 0)
    first_dense = int(cfg.get("first_k_dense_replace", 0))
    freq = int(cfg.get("moe_layer_freq", 1))
    moe = tuple(i for i in range(layers) if n_routed and i >= first_dense and i % freq == 0)
    nope, rope_d = int(_req(cfg, "qk_nope_head_dim")), int(_req(cfg, "qk_rope_head_dim"))
    shared = int(cfg.get("n_shared_experts") or 0)
    moe_i = int(cfg.get("moe_intermediate_size") or 0)
    return dict(
        head_size=int(_req(cfg, "kv_lora_rank")) + rope_d,
        kv_lora_rank=int(_req(cfg, "kv_lora_rank")),
        qk_rope_head_dim=rope_d,
        qk_nope_head_dim=nope,
        v_head_dim=int(_req(cfg, "v_head_dim")),
        q_lora_rank=(int(cfg["q_lora_rank"]) if cfg.get("q_lora_rank") else None),
        num_experts=n_routed,
        num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 0),
        moe_intermediate_size=moe_i,
        moe_layers=moe,
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
        shared_expert_intermediate_size=shared * moe_i,
        shared_expert_gated=False,
    )


def _hybrid_fields(cfg: dict, layers: int) -> dict[str, Any]:
    """Bamba-style hybrid: attention on even layers, Mamba-2 on odd ones (kvcache.py's layout)."""
    attn = list(cfg.get("attn_layer_indices") or [])
    if attn != list(range(0, layers, 2)):
        raise ConfigError(
            f"config.json: attn_layer_indices {attn} not supported: the KV layout "
            "(kvcache.py) has attention on even layers and SSM on odd layers"
        )
    if (cfg.get("num_experts") or 1) != 1:
        raise ConfigError("config.json: hybrid models with MoE feed-forward are not supported")
    hidden = int(_req(cfg, "hidden_size"))
    heads = int(_req(cfg, "mamba_n_heads"))
    head_dim = cfg.get("mamba_d_head")
    head_dim = (
        int(cfg.get("mamba_expand", 2) * hidden // heads)
        if head_dim in (None, "auto")
        else int(head_dim)
    )
    limit = cfg.get("time_step_limit") or (0.0, float("inf"))
    lim = tuple(float("inf") if isinstance(v, dict) else float(v) for v in limit)
    return dict(
        ssm_heads=heads,
        ssm_head_dim=head_dim,
        ssm_groups=int(cfg.get("mamba_n_groups", 1)),
        d_state=int(_req(cfg, "mamba_d_state")),
        conv_kernel=int(cfg.get("mamba_d_conv", 4)),
        time_step_limit=(lim[0], lim[1]),
    )
