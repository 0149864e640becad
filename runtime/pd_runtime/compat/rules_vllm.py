"""The vLLM NixlConnector rules, as data.

Each entry cites where upstream enforces or documents it: files of vLLM's
`vllm/distributed/kv_transfer/kv_connector/v1/nixl/` package (0.33.0 line numbers unless a range
says otherwise), the upstream compatibility page (`docs/features/nixl_connector_compatibility.md`)
and issues. The `checklist` tag is the admission-checklist item (A1..F39) a rule implements.
"""

from __future__ import annotations

from collections.abc import Callable

from .pool import ENGINE_HTTP_PORT
from .pool import ResolvedPool as Pool
from .rule import REJECT, WARN, Rule
from .versions import between, since, until

MATRIX_PAGE = "vLLM docs/features/nixl_connector_compatibility.md"
MANAGED_FLAGS = (
    "--model", "--served-model-name", "--dtype", "--tensor-parallel-size", "-tp",
    "--pipeline-parallel-size", "-pp", "--data-parallel-size", "-dp", "--block-size",
    "--kv-cache-dtype", "--attention-backend", "--kv-transfer-config",
    "--disable-hybrid-kv-cache-manager", "--enable-hybrid-kv-cache-manager",
    "--speculative-config", "--port", "--decode-context-parallel-size", "-dcp",
)
CROSS_LAYER_BACKENDS = frozenset({"FLASH_ATTN", "FLASHINFER", "TRITON_ATTN"})


# --- conditions shared by several rules --------------------------------------------------------
def _unequal_blocks(p: Pool, d: Pool) -> bool:
    return p.block_size != d.block_size


def _permute_applies(p: Pool, d: Pool) -> bool:
    """D may receive HND and permute to NHD (vllm-nixl-rules.md §5)."""
    return (
        not p.is_mla
        and p.kv_cache_layout == "HND"
        and d.kv_cache_layout == "NHD"
        and d.enable_permute_local_kv
    )


def _kv_replicated_on_p(p: Pool, d: Pool) -> bool:
    return p.tp > p.num_kv_heads


def effective_cross_layers(x: Pool) -> bool:
    return (
        x.enable_cross_layers_blocks
        and x.attention_backend in CROSS_LAYER_BACKENDS
        and x.kv_cache_layout == "HND"
        and not x.is_hybrid_ssm
    )


def _spec_key(x: Pool) -> tuple | None:
    """What must match between the two sides' speculation (eagle family and draft models)."""
    s = x.speculative
    if s is None or s.method in ("ngram", "suffix", "medusa", "mlp_speculator"):
        return None
    return (s.method, s.model, s.revision, s.kv_cache_dtype or x.kv_cache_dtype)


def _env(x: Pool, name: str) -> str | None:
    return x.env.get(name)


def either_pool(pred: Callable[[Pool], bool]) -> Callable[[Pool, Pool], bool]:
    """A pair condition that holds when `pred` holds for the prefill or the decode pool."""
    return lambda p, d: pred(p) or pred(d)


RULES: tuple[Rule, ...] = (
    # ---------------------------------------------------------------- A. identity and hash
    Rule(
        id="ENGINE-VERSION-MATCH", severity=REJECT, checklist="A1",
        summary="Prefill and decode run the same vLLM version.",
        when=lambda p, d: ((p.engine_version or p.engine_image)
                           != (d.engine_version or d.engine_image)),
        fields=("p.engine_version", "d.engine_version"),
        message="prefill runs vLLM {p.engine_version} ({p.engine_image}) and decode runs "
        "{d.engine_version} ({d.engine_image}); vllm_version is a compatibility-hash factor, "
        "so every handshake fails",
        fix="use one image and version for both pools: set spec.engine and remove the per-pool "
        "engine overrides",
        source="vLLM 0.33.0 nixl/metadata.py L146-216 (hash factors); vllm-project/vllm#33702",
    ),
    Rule(
        id="ENGINE-IMAGE-DIFFERS", severity=WARN, checklist="A1",
        summary="Same version but different images: builds may differ "
        "(dev builds hash differently).",
        when=lambda p, d: p.engine_version is not None
        and p.engine_version == d.engine_version and p.engine_image != d.engine_image,
        fields=("p.engine_image", "d.engine_image"),
        message="prefill image {p.engine_image} and decode image {d.engine_image} differ although "
        "both claim vLLM {p.engine_version}; a dev or patched build reports another version string",
        fix="use the same image reference (ideally pinned by digest) for both pools",
        source="vLLM 0.33.0 nixl/metadata.py L146-216 "
        "(vllm_version is compared as an exact string)",
    ),
    Rule(
        id="CONNECTOR-MATCH", severity=REJECT, checklist="A2", versions=since(0, 24),
        summary="Both pools use the pull connector, or both the push connector.",
        when=lambda p, d: p.is_push != d.is_push,
        fields=("p.connector", "d.connector"),
        message="prefill uses {p.connector} and decode uses {d.connector}; a pull instance "
        "cannot pair with a push instance (transfer_mode is hashed from 0.28, and 0.24-0.26 "
        "fail at run time)",
        fix="set spec.kvTransfer.connector once, for both pools",
        source="vLLM 0.33.0 nixl/connector.py L391-432; "
        "nixl/metadata.py (transfer_mode factor, 0.28+)",
    ),
    Rule(
        id="PUSH-CONNECTOR-UNAVAILABLE", severity=REJECT, versions=until(0, 22),
        summary="NixlPushConnector exists from vLLM 0.24.",
        when=either_pool(lambda x: x.is_push),
        fields=("p.connector", "d.connector"),
        message="NixlPushConnector does not exist in vLLM {p.engine_version}; it was added in 0.24",
        fix="use connector NixlConnector, or vLLM 0.24 or newer",
        source="vLLM 0.24 release (push connector added)",
    ),
    Rule(
        id="MODEL-NAME-MATCH", severity=REJECT, checklist="A3",
        summary="Both pools start the engine with the same model string.",
        when=lambda p, d: p.model_name != d.model_name,
        fields=("p.model_name", "d.model_name"),
        message="prefill serves model '{p.model_name}' and decode serves '{d.model_name}'; the "
        "model string itself is hashed (not the weights), so even identical weights under "
        "different paths fail the handshake",
        fix="start both pools with exactly the same spec.model.name (same path or hub id)",
        source="vLLM 0.33.0 nixl/metadata.py L146-216 (model = model_config.model)",
    ),
    Rule(
        id="MODEL-REVISION-DIFFERS", severity=WARN, checklist="A3",
        summary="Same model string with different revisions cannot be told apart by the hash.",
        when=lambda p, d: p.model_name == d.model_name and p.model_revision != d.model_revision,
        fields=("p.model_revision", "d.model_revision"),
        message="both pools serve '{p.model_name}' but at revisions {p.model_revision} and "
        "{d.model_revision}; the revision is not hashed, so mismatched weights would exchange "
        "KV silently",
        fix="pin the same spec.model.revision on both pools",
        source="vLLM 0.33.0 nixl/metadata.py L146-216 (revision not hashed)",
    ),
    Rule(
        id="DTYPE-MATCH", severity=REJECT, checklist="A4",
        summary="Both pools resolve the same model dtype.",
        when=lambda p, d: p.dtype != d.dtype,
        fields=("p.dtype", "d.dtype"),
        message="prefill runs {p.dtype} and decode runs {d.dtype}; dtype is a hash factor and "
        "the KV bytes would not line up",
        fix="set the same spec.model.dtype on both pools",
        source="vLLM 0.33.0 nixl/metadata.py L146-216 (dtype factor)",
    ),
    Rule(
        id="MODEL-GEOMETRY-MATCH", severity=REJECT, checklist="A5",
        summary="KV heads, head size and layer count are the same on both pools.",
        when=lambda p, d: (p.num_kv_heads, p.head_size, p.num_hidden_layers)
        != (d.num_kv_heads, d.head_size, d.num_hidden_layers),
        fields=("p.num_kv_heads", "d.num_kv_heads", "p.head_size", "d.head_size",
                "p.num_hidden_layers", "d.num_hidden_layers"),
        message="prefill has {p.num_kv_heads} KV heads x {p.head_size} x {p.num_hidden_layers} "
        "layers, decode has {d.num_kv_heads} x {d.head_size} x {d.num_hidden_layers}; these "
        "are hash factors and set every block's size",
        fix="describe the same model on both pools (pdctl model-info CONFIG.json prints the block)",
        source="vLLM 0.33.0 nixl/metadata.py L146-216; "
        "base_worker.py L2877-2979 (block-length checks)",
    ),
    Rule(
        id="ATTN-BACKEND-MATCH", severity=REJECT, checklist="A6",
        summary="Explicit attention backends are the same on both pools.",
        when=lambda p, d: "auto" not in (p.attention_backend, d.attention_backend)
        and p.attention_backend != d.attention_backend,
        fields=("p.attention_backend", "d.attention_backend"),
        message="prefill uses attention backend {p.attention_backend} and decode "
        "{d.attention_backend}; attn_backend_name is a hash factor",
        fix="set the same attentionBackend on both pools",
        source="vLLM 0.33.0 nixl/metadata.py L146-216; base_worker.py L977-978",
    ),
    Rule(
        # Found by the live tier (docs/live-vllm.md): admitted, then vLLM refused to start with
        # "No common block size for 16 (CPU_ATTN: [MultipleOf(32)])".
        id="CPU-ATTN-BLOCK-SIZE", severity=REJECT, versions=since(0, 32),
        summary="The CPU attention backend needs a block size that is a multiple of 32.",
        when=either_pool(lambda x: x.attention_backend == "CPU_ATTN" and x.block_size % 32 != 0),
        fields=("p.attention_backend", "p.block_size", "d.attention_backend", "d.block_size"),
        message="CPU_ATTN supports block sizes that are multiples of 32 only (prefill "
        "{p.attention_backend}/{p.block_size}, decode {d.attention_backend}/{d.block_size}); "
        "vLLM refuses to start with 'No common block size'",
        fix="use blockSize 32 (or 64, 128, ...) on the CPU_ATTN pool(s)",
        source="vLLM 0.32.0/0.33.0 v1/attention/backends/cpu_attn.py L65-66 "
        "(get_supported_kernel_block_sizes -> [MultipleOf(32)]); v1/worker/utils.py L555; "
        "seen live by tests/live (0.28.0 allowed multiples of 16)",
    ),
    Rule(
        id="ATTN-BACKEND-AUTO", severity=WARN, checklist="A6",
        summary="An auto-selected backend depends on the GPU: the hash cannot be predicted.",
        when=lambda p, d: "auto" in (p.attention_backend, d.attention_backend),
        fields=("p.attention_backend", "d.attention_backend", "p.gpu_product", "d.gpu_product"),
        message="attention backend is 'auto' (prefill {p.attention_backend}, decode "
        "{d.attention_backend}; GPUs {p.gpu_product} / {d.gpu_product}); vLLM picks it per GPU, "
        "so P and D on different GPU generations can pick different backends and fail the hash",
        fix="pin attentionBackend (e.g. FLASH_ATTN) on both pools",
        source="vLLM attention selector; vLLM 0.33.0 nixl/base_worker.py L977-978",
    ),
    Rule(
        id="KV-DTYPE-MATCH", severity=REJECT, checklist="A7",
        summary="The kv-cache dtype strings are identical (fp8 and fp8_e4m3 differ).",
        when=lambda p, d: p.kv_cache_dtype != d.kv_cache_dtype,
        fields=("p.kv_cache_dtype", "d.kv_cache_dtype"),
        message="prefill kvCacheDtype '{p.kv_cache_dtype}' and decode '{d.kv_cache_dtype}' "
        "differ; cache_dtype is hashed as the literal string (fp8 and fp8_e4m3 are different "
        "hashes even where they mean the same bytes)",
        fix="spell kvCacheDtype identically on both pools",
        source="vLLM 0.33.0 nixl/metadata.py L146-216 (cache_dtype as given to --kv-cache-dtype)",
    ),
    Rule(
        id="HMA-MATCH", severity=REJECT, checklist="A8", versions=since(0, 18),
        summary="The hybrid KV cache manager is on or off on both pools.",
        when=lambda p, d: p.hma != d.hma,
        fields=("p.hma", "d.hma"),
        message="hybridKVCacheManager is {p.hma} on prefill and {d.hma} on decode; "
        "is_hma_enabled is a hash factor from 0.18, even for dense models",
        fix="set the same hybridKVCacheManager on both pools (leave it on)",
        source="vLLM 0.33.0 nixl/metadata.py L146-216; config/vllm.py L2223-2295",
    ),
    Rule(
        id="SPEC-MATCH", severity=REJECT, checklist="A9",
        summary="Eagle-family and draft-model speculation is identical on both pools.",
        when=lambda p, d: _spec_key(p) != _spec_key(d),
        fields=("p.speculative", "d.speculative"),
        message="speculative decoding differs: prefill {p.speculative} and decode "
        "{d.speculative}; eagle-family configs are hashed (0.28+) and a draft model adds KV "
        "layers, so the pools cannot exchange KV",
        fix="give both pools the same speculative block (method, model, revision, kv dtype); "
        "numSpeculativeTokens may differ except for multi-module MTP",
        source=f"vLLM 0.33.0 nixl/metadata.py L103-143; {MATRIX_PAGE} footnote 1",
    ),
    Rule(
        id="SPEC-MTP-TOKENS", severity=WARN, checklist="A9",
        summary="Multi-module MTP needs the same numSpeculativeTokens on both pools.",
        when=lambda p, d: p.speculative is not None and d.speculative is not None
        and p.speculative.method == d.speculative.method == "mtp"
        and p.speculative.num_speculative_tokens != d.speculative.num_speculative_tokens,
        fields=("p.speculative", "d.speculative"),
        message="MTP with numSpeculativeTokens {p.speculative.num_speculative_tokens} on prefill "
        "and {d.speculative.num_speculative_tokens} on decode: each side backs off a different "
        "number of prompt tokens, so D can load positions P never computed",
        fix="use the same numSpeculativeTokens on both pools",
        source="vLLM 0.33.0 nixl/base_scheduler.py L385-409; config/vllm.py L655-675",
    ),
    Rule(
        id="CROSS-LAYER-MATCH", severity=REJECT, checklist="A10",
        versions=between((0, 16), (0, 28)),
        summary="Effective cross-layer blocks agree (hashed in 0.16-0.28).",
        when=lambda p, d: effective_cross_layers(p) != effective_cross_layers(d),
        fields=("p.enable_cross_layers_blocks", "d.enable_cross_layers_blocks",
                "p.attention_backend", "d.attention_backend"),
        message="cross-layer blocks end up enabled on one pool only (it needs the flag, a "
        "FLASH_ATTN/FLASHINFER backend and HND); cross_layers_blocks is a hash factor in 0.16-0.28",
        fix="enable cross-layer blocks on both pools with the same backend and HND, or on neither",
        source=f"vLLM 0.33.0 nixl/metadata.py (0.16-0.28); {MATRIX_PAGE} footnote 2",
    ),
    Rule(
        id="CROSS-LAYER-REQUIREMENTS", severity=WARN, versions=between((0, 16), (0, 28)),
        summary="Cross-layer blocks need FLASH_ATTN/FLASHINFER and HND, else they stay off.",
        when=either_pool(lambda x: x.enable_cross_layers_blocks and not effective_cross_layers(x)
                   and not x.is_hybrid_ssm),
        fields=("p.enable_cross_layers_blocks", "p.attention_backend", "p.kv_cache_layout"),
        message="enableCrossLayersBlocks is set but needs the FLASH_ATTN or FLASHINFER backend "
        "and the HND layout; vLLM silently leaves it off",
        fix="pin attentionBackend FLASH_ATTN and kvCacheLayout HND, or drop the flag",
        source=f"{MATRIX_PAGE} footnote 2",
    ),
    Rule(
        id="CROSS-LAYER-SSM", severity=REJECT, versions=between((0, 16), (0, 28)),
        families=frozenset({"hybrid-ssm"}),
        summary="Hybrid SSM models cannot use cross-layer blocks.",
        when=either_pool(lambda x: x.enable_cross_layers_blocks),
        fields=("p.enable_cross_layers_blocks", "d.enable_cross_layers_blocks"),
        message="cross-layer blocks are not supported for hybrid SSM (Mamba) models",
        fix="remove spec.kvTransfer.enableCrossLayersBlocks",
        source=f"{MATRIX_PAGE} (Hybrid SSM x Cross-layer blocks: not supported)",
    ),
    Rule(
        id="CROSS-LAYER-UNAVAILABLE", severity=REJECT, versions=until(0, 15),
        summary="Cross-layer blocks do not exist before vLLM 0.16.",
        when=either_pool(lambda x: x.enable_cross_layers_blocks),
        fields=("p.enable_cross_layers_blocks", "p.engine_version"),
        message="enableCrossLayersBlocks is set but vLLM {p.engine_version} has no cross-layer "
        "blocks (added in 0.16)",
        fix="remove spec.kvTransfer.enableCrossLayersBlocks, or use vLLM 0.16-0.28",
        source="vLLM 0.16 release (enable_cross_layers_blocks added)",
    ),
    Rule(
        id="CROSS-LAYER-REMOVED", severity=WARN, versions=since(0, 29),
        summary="enable_cross_layers_blocks was removed in 0.30 (packed layouts replace it).",
        when=either_pool(lambda x: x.enable_cross_layers_blocks),
        fields=("p.enable_cross_layers_blocks",),
        message="vLLM {p.engine_version} no longer reads enable_cross_layers_blocks; the flag "
        "is ignored",
        fix="remove spec.kvTransfer.enableCrossLayersBlocks",
        source="vLLM 0.30 nixl connector (key removed)",
    ),
    # ---------------------------------------------------------------- B. parallelism
    Rule(
        id="TP-DIVISIBLE", severity=REJECT, checklist="B12",
        summary="The larger transfer TP is a multiple of the smaller.",
        when=lambda p, d: (max(p.transfer_tp, d.transfer_tp)
                           % min(p.transfer_tp, d.transfer_tp) != 0),
        fields=("p.tp", "d.tp"),
        message="prefill TP {p.transfer_tp} and decode TP {d.transfer_tp} do not divide each "
        "other; heterogeneous TP maps whole head groups between ranks",
        fix="choose TP sizes where one divides the other (e.g. 2 and 4, or 4 and 8)",
        source="vLLM 0.33.0 kv_connector/utils.py L522-539 (tp_ratio assert)",
    ),
    Rule(
        id="TP-PREFILL-GT-DECODE", severity=REJECT, checklist="B12", versions=until(0, 13),
        summary="Up to 0.13, decode TP cannot be smaller than prefill TP.",
        when=lambda p, d: p.transfer_tp > d.transfer_tp,
        fields=("p.tp", "d.tp"),
        message="prefill TP {p.tp} is larger than decode TP {d.tp}; vLLM {p.engine_version} "
        "asserts 'Decode TP cannot be smaller than prefill TP' (vllm-project/vllm#43523)",
        fix="use decode TP >= prefill TP, or vLLM 0.14+ (PR #27274 added P TP > D TP)",
        source="vLLM 0.11-0.13 nixl_connector tp_ratio assert; vllm-project/vllm#43523, PR #27274",
    ),
    Rule(
        id="TP-EXCEEDS-KV-HEADS", severity=REJECT, checklist="B13", versions=since(0, 14),
        families=frozenset({"dense", "moe", "multimodal", "encoder-decoder"}),
        summary="Dense/MoE: prefill TP above decode TP must not exceed the KV head count.",
        when=lambda p, d: p.tp > d.tp and p.tp > p.num_kv_heads,
        fields=("p.tp", "d.tp", "p.num_kv_heads"),
        message="prefill TP {p.tp} is above decode TP {d.tp} and above the model's "
        "{p.num_kv_heads} KV heads, so prefill ranks hold replicated heads that decode cannot "
        "merge (a bare assert in the worker)",
        fix="use prefill TP <= {p.num_kv_heads} or decode TP >= prefill TP",
        source="vLLM 0.33.0 nixl/base_worker.py L2726-2730",
    ),
    Rule(
        id="NVFP4-HETERO-TP", severity=REJECT, checklist="B14",
        summary="NVFP4 KV cannot be re-sharded across different per-rank head counts.",
        when=lambda p, d: p.kv_cache_dtype.startswith("nvfp4")
        and p.kv_heads_per_rank != d.kv_heads_per_rank,
        fields=("p.kv_cache_dtype", "p.tp", "d.tp"),
        message="kvCacheDtype {p.kv_cache_dtype} with {p.kv_heads_per_rank} heads per prefill "
        "rank and {d.kv_heads_per_rank} per decode rank: NVFP4 heads are not contiguous slices",
        fix="use the same TP on both pools with NVFP4 KV",
        source="vLLM 0.33.0 nixl/base_worker.py L2862-2876",
    ),
    Rule(
        id="DECODE-PP", severity=REJECT, checklist="B15",
        summary="Decode cannot use pipeline parallelism.",
        when=lambda p, d: d.pp > 1,
        fields=("d.pp",),
        message="decode pipelineParallelSize is {d.pp}; a KV consumer with PP > 1 is not supported",
        fix="set decode pipelineParallelSize to 1 (use TP instead)",
        source="vLLM 0.33.0 nixl/base_worker.py L866-889",
    ),
    Rule(
        id="PREFILL-PP-PULL", severity=REJECT, checklist="B15",
        summary="Prefill PP > 1 needs the push connector.",
        when=lambda p, d: p.pp > 1 and not p.is_push,
        fields=("p.pp", "p.connector"),
        message="prefill pipelineParallelSize is {p.pp} with the pull connector; decode would "
        "see a partial layer set and fail the layer-count check",
        fix="set prefill pipelineParallelSize to 1, or use NixlPushConnector (0.24+)",
        source="vLLM 0.33.0 nixl/base_worker.py L866-889",
    ),
    Rule(
        id="PREFILL-PP-MAMBA", severity=REJECT, checklist="B15", families=frozenset({"hybrid-ssm"}),
        summary="Hybrid SSM models cannot use pipeline parallelism.",
        when=lambda p, d: p.pp > 1 or d.pp > 1,
        fields=("p.pp", "d.pp"),
        message="pipeline parallelism is not supported with Mamba layers",
        fix="set pipelineParallelSize to 1 on both pools",
        source="vLLM 0.33.0 nixl/base_worker.py L878-884",
    ),
    Rule(
        id="DCP-VALUE", severity=REJECT, checklist="B16",
        summary="Decode context parallel is 1 or equal to TP.",
        when=either_pool(lambda x: x.dcp not in (1, x.tp)),
        fields=("p.dcp", "d.dcp", "p.tp", "d.tp"),
        message="decodeContextParallelSize must be 1 or equal to the pool's TP (prefill DCP "
        "{p.dcp} with TP {p.tp}, decode DCP {d.dcp} with TP {d.tp})",
        fix="set decodeContextParallelSize to 1 or to tensorParallelSize",
        source="vLLM 0.33.0 config/vllm.py L1573-1590",
    ),
    Rule(
        id="DCP-NON-MLA", severity=REJECT, checklist="B16",
        families=frozenset({"dense", "moe", "hybrid-ssm", "multimodal", "encoder-decoder"}),
        summary="Decode context parallel works only for MLA models.",
        when=either_pool(lambda x: x.dcp > 1),
        fields=("p.dcp", "d.dcp", "p.family"),
        message="decodeContextParallelSize > 1 needs an MLA model; this is a {p.family} model",
        fix="set decodeContextParallelSize to 1",
        source="vLLM 0.33.0 config/vllm.py L1573-1590",
    ),
    Rule(
        id="DCP-DIVISIBLE", severity=REJECT, checklist="B16",
        summary="Prefill and decode DCP sizes divide each other.",
        when=lambda p, d: max(p.dcp, d.dcp) % min(p.dcp, d.dcp) != 0,
        fields=("p.dcp", "d.dcp"),
        message="prefill DCP {p.dcp} and decode DCP {d.dcp} do not divide each other",
        fix="choose DCP sizes where one divides the other",
        source="vLLM 0.33.0 nixl/base_worker.py L2706-2713",
    ),
    Rule(
        id="DCP-PUSH", severity=REJECT, checklist="B16",
        summary="The push connector does not support DCP > 1.",
        when=lambda p, d: (p.is_push or d.is_push) and max(p.dcp, d.dcp) > 1,
        fields=("p.connector", "p.dcp", "d.dcp"),
        message="NixlPushConnector with decodeContextParallelSize > 1 is rejected by vLLM",
        fix="use the pull connector, or DCP 1",
        source="vLLM 0.33.0 nixl/connector.py L401-404",
    ),
    Rule(
        id="SIDE-CHANNEL-PORTS", severity=REJECT, checklist="B18",
        summary="Side-channel ports base..base+DP-1 are valid and free.",
        when=either_pool(lambda x: x.side_channel_port + x.dp - 1 > 65535
                   or x.side_channel_port <= ENGINE_HTTP_PORT < x.side_channel_port + x.dp),
        fields=("p.side_channel_port", "p.dp", "d.dp"),
        message=f"side-channel ports {{p.side_channel_port}}..+DP-1 must stay below 65536 and "
        f"must not include the engine's HTTP port {ENGINE_HTTP_PORT}",
        fix="choose a sideChannelPort such that port + dataParallelSize - 1 avoids "
        f"{ENGINE_HTTP_PORT} and 65535",
        source="vLLM 0.33.0 nixl/base_scheduler.py L76-80 (port = base + DP index)",
    ),
    # ---------------------------------------------------------------- C. layout and block size
    Rule(
        id="LAYOUT-MATCH", severity=REJECT, checklist="C19",
        families=frozenset({"dense", "moe", "hybrid-ssm", "multimodal", "encoder-decoder"}),
        summary="Non-MLA pools use the same KV layout (or the HND->NHD permute).",
        when=lambda p, d: p.kv_cache_layout != d.kv_cache_layout and not _permute_applies(p, d),
        fields=("p.kv_cache_layout", "d.kv_cache_layout", "d.enable_permute_local_kv"),
        message="prefill layout {p.kv_cache_layout} and decode layout {d.kv_cache_layout} "
        "differ ('Heterogeneous TP expects same kv_cache_layout'); only HND prefill to NHD "
        "decode with enablePermuteLocalKV is handled",
        fix="use kvCacheLayout HND on both pools",
        source="vLLM 0.33.0 nixl/base_worker.py L2795-2814",
    ),
    Rule(
        id="LAYOUT-PERMUTE-EXPERIMENTAL", severity=WARN, checklist="C19",
        summary="HND->NHD permute on decode is experimental.",
        when=lambda p, d: _permute_applies(p, d) and not d.hma_required,
        fields=("d.enable_permute_local_kv", "d.kv_cache_layout"),
        message="decode receives HND blocks and permutes them to NHD after every read "
        "(experimental, extra work per transfer)",
        fix="use HND on decode too and drop enablePermuteLocalKV",
        source=f"{MATRIX_PAGE} (KV cache layout); nixl/base_worker.py L2795-2806",
    ),
    Rule(
        id="PERMUTE-HMA", severity=REJECT, checklist="C19",
        summary="The HND->NHD permute is not supported when HMA is required.",
        when=lambda p, d: _permute_applies(p, d) and d.hma_required,
        fields=("d.enable_permute_local_kv", "d.sliding_window", "d.family"),
        message="enablePermuteLocalKV with a sliding-window or hybrid model: 'HMA does not "
        "support block size post processing'",
        fix="use kvCacheLayout HND on both pools",
        source=f"vLLM 0.33.0 nixl/base_worker.py L2800-2806; {MATRIX_PAGE} "
        "(permute: not supported with HMA)",
    ),
    Rule(
        id="HETERO-TP-LAYOUT", severity=REJECT, checklist="C20",
        families=frozenset({"dense", "moe", "hybrid-ssm", "multimodal", "encoder-decoder"}),
        summary="Heterogeneous TP head splitting needs HND on decode.",
        when=lambda p, d: p.tp != d.tp and not _kv_replicated_on_p(p, d)
        and d.kv_cache_layout == "NHD" and not _permute_applies(p, d),
        fields=("p.tp", "d.tp", "d.kv_cache_layout"),
        message="prefill TP {p.tp} and decode TP {d.tp} need head splitting, which requires "
        "contiguous heads inside a block; decode layout NHD interleaves them",
        fix="use kvCacheLayout HND on both pools (the NixlConnector default), or equal TP",
        source=f"vLLM 0.33.0 nixl/base_worker.py L2832-2844; {MATRIX_PAGE} "
        "(NHD does not allow hetero TP)",
    ),
    Rule(
        id="BLOCK-DIVISIBLE", severity=REJECT, checklist="C21",
        summary="Decode block size is a multiple of prefill block size (pull).",
        when=lambda p, d: not d.is_push and d.block_size % p.block_size != 0,
        fields=("p.block_size", "d.block_size"),
        message="decode blockSize {d.block_size} is not a multiple of prefill blockSize "
        "{p.block_size}; D maps each of its blocks onto whole P blocks",
        fix="make decode blockSize a multiple of prefill blockSize (e.g. P 16, D 16/32/64)",
        source=f"vLLM 0.33.0 kv_connector/utils.py L541-547; {MATRIX_PAGE} footnote 3",
    ),
    Rule(
        id="BLOCK-HOST-BUFFER", severity=REJECT, checklist="C21",
        summary="Different block sizes are not supported with a CPU host buffer.",
        when=lambda p, d: _unequal_blocks(p, d) and "cpu" in (p.buffer_device, d.buffer_device),
        fields=("p.block_size", "d.block_size", "d.buffer_device"),
        message="blockSize differs ({p.block_size} vs {d.block_size}) with bufferDevice cpu",
        fix="use equal block sizes with a host buffer",
        source="vLLM 0.33.0 nixl/base_worker.py L2782-2787",
    ),
    Rule(
        id="BLOCK-HETERO-TP-MERGE", severity=REJECT, checklist="C21",
        families=frozenset({"dense", "moe", "hybrid-ssm", "multimodal", "encoder-decoder"}),
        summary="Different block sizes are not supported when prefill TP > decode TP.",
        when=lambda p, d: _unequal_blocks(p, d) and p.tp > d.tp,
        fields=("p.block_size", "d.block_size", "p.tp", "d.tp"),
        message="blockSize differs ({p.block_size} vs {d.block_size}) while prefill TP {p.tp} "
        "is above decode TP {d.tp}",
        fix="use equal block sizes when prefill TP exceeds decode TP",
        source="vLLM 0.33.0 nixl/base_worker.py L2940-2943",
    ),
    Rule(
        id="BLOCK-PUSH", severity=REJECT, checklist="C21",
        summary="The push connector needs equal block sizes.",
        when=lambda p, d: _unequal_blocks(p, d) and (p.is_push or d.is_push),
        fields=("p.block_size", "d.block_size", "p.connector"),
        message="blockSize differs ({p.block_size} vs {d.block_size}) with NixlPushConnector",
        fix="use equal block sizes with the push connector",
        source="vLLM 0.33.0 nixl/push_worker.py (block ratio computed from the P side)",
    ),
    Rule(
        id="BLOCK-HMA", severity=REJECT, checklist="C21", versions=until(0, 26),
        summary="Up to 0.26, HMA-required models (SWA, hybrid) need equal block sizes.",
        when=lambda p, d: _unequal_blocks(p, d) and (p.hma_required or d.hma_required),
        fields=("p.block_size", "d.block_size", "p.sliding_window", "p.family"),
        message="blockSize differs ({p.block_size} vs {d.block_size}) on a model that requires "
        "the hybrid KV cache manager (sliding window or Mamba): 'HMA does not support different "
        "remote block size yet'",
        fix="use equal block sizes, or vLLM 0.28+",
        source=f"nixl _validate_remote_agent_handshake (<= 0.26); {MATRIX_PAGE} footnotes 3 and 6",
    ),
    Rule(
        id="BLOCK-HETERO", severity=WARN, checklist="C21",
        unless=("BLOCK-DIVISIBLE", "BLOCK-HOST-BUFFER", "BLOCK-HETERO-TP-MERGE", "BLOCK-PUSH",
                "BLOCK-HMA"),
        summary="Different block sizes work but cost a remap and tail zeroing.",
        when=_unequal_blocks,
        fields=("p.block_size", "d.block_size"),
        message="prefill blockSize {p.block_size} and decode {d.block_size}: each decode block "
        "is assembled from several prefill blocks and reordered; prefix caching on decode with "
        "unequal blocks is suspect (vllm-project/vllm PR #51527)",
        fix="use equal block sizes unless you need the decode block size",
        source=f"{MATRIX_PAGE} footnote 3; nixl/base_worker.py L3039-3130, L3759-3854",
    ),
    # ---------------------------------------------------------------- D. model family specifics
    Rule(
        id="ENCDEC-UNSUPPORTED", severity=REJECT, families=frozenset({"encoder-decoder"}),
        summary="Encoder-decoder models are not supported by NixlConnector.",
        when=lambda p, d: True,
        fields=("p.family",),
        message="encoder-decoder models cannot be disaggregated with NixlConnector (no "
        "capability of the matrix is supported)",
        fix="serve encoder-decoder models without P/D disaggregation",
        source=f"{MATRIX_PAGE} (Encoder-Decoder row: not supported)",
    ),
    Rule(
        id="MULTIMODAL-UNVALIDATED", severity=WARN, families=frozenset({"multimodal"}),
        summary="Multimodal models are not validated upstream.",
        when=lambda p, d: True,
        fields=("p.family",),
        message="multimodal models are marked unknown / not yet validated for NixlConnector; "
        "requests with media skip token-id forwarding to decode",
        fix="prove the pairing with a staging deployment before production",
        source=f"{MATRIX_PAGE} (Multimodal row: unknown)",
    ),
    Rule(
        id="SSM-UNSUPPORTED", severity=REJECT, families=frozenset({"hybrid-ssm"}),
        versions=until(0, 16),
        summary="Up to 0.16 NIXL lacked HMA support, so hybrid SSM models cannot run P/D.",
        when=lambda p, d: True,
        fields=("p.family", "p.engine_version"),
        message="vLLM {p.engine_version}: NixlConnector does not support the hybrid KV cache "
        "manager that Mamba layers need",
        fix="use vLLM 0.18 or newer (0.20+ for heterogeneous TP)",
        source="vLLM 0.18 release (NIXL SupportsHMA)",
    ),
    Rule(
        id="SSM-HETERO-TP", severity=REJECT, families=frozenset({"hybrid-ssm"}),
        versions=until(0, 18),
        summary="Up to 0.18 hybrid SSM models need equal TP.",
        when=lambda p, d: p.tp != d.tp,
        fields=("p.tp", "d.tp"),
        message="hybrid SSM (Mamba) models require homogeneous TP in vLLM {p.engine_version} "
        "(prefill TP {p.tp}, decode TP {d.tp})",
        fix="use the same TP on both pools, or vLLM 0.20+",
        source=f"{MATRIX_PAGE} footnote 5",
    ),
    Rule(
        id="SSM-CONV-LAYOUT", severity=REJECT, checklist="D23", families=frozenset({"hybrid-ssm"}),
        versions=since(0, 20),
        summary="Mamba conv state layout DS on both pools.",
        when=either_pool(lambda x: x.env.get("VLLM_SSM_CONV_STATE_LAYOUT", "DS") != "DS"),
        fields=("p.env", "d.env"),
        message="VLLM_SSM_CONV_STATE_LAYOUT is overridden to something other than DS; the "
        "3-read Mamba transfer requires DS on both pools",
        fix="remove the VLLM_SSM_CONV_STATE_LAYOUT override (the operator sets DS)",
        source="vLLM 0.33.0 nixl/base_worker.py L701-707; mamba_utils.py L29-50",
    ),
    Rule(
        id="SSM-HMA-OFF", severity=REJECT, checklist="D23", families=frozenset({"hybrid-ssm"}),
        summary="Hybrid SSM models need the hybrid KV cache manager.",
        when=either_pool(lambda x: not x.hma),
        fields=("p.hma", "d.hma"),
        message="hybridKVCacheManager is off (prefill {p.hma}, decode {d.hma}); Mamba layers "
        "require it",
        fix="set hybridKVCacheManager: true on both pools",
        source="vLLM 0.33.0 nixl/base_worker.py L700",
    ),
    Rule(
        id="SSM-MAMBA-TYPE", severity=REJECT, checklist="D23", families=frozenset({"hybrid-ssm"}),
        versions=since(0, 20),
        summary="Only Mamba1, Mamba2 and GDN state can be transferred.",
        when=either_pool(lambda x: x.mamba_type in ("short-conv", "linear")),
        fields=("p.mamba_type",),
        message="mambaType {p.mamba_type} (e.g. LFM2, MiniMax-linear) raises NotImplementedError "
        "in the NIXL worker",
        fix="serve this model without P/D disaggregation",
        source="vLLM 0.33.0 ssm_conv_transfer_utils.py L107-219",
    ),
    Rule(
        id="SSM-PREFIX-BLOCKS", severity=REJECT, checklist="D23",
        families=frozenset({"hybrid-ssm"}),
        summary="Mamba with prefix caching needs equal block sizes.",
        when=lambda p, d: _unequal_blocks(p, d) and (p.prefix_caching or d.prefix_caching),
        fields=("p.block_size", "d.block_size", "p.prefix_caching", "d.prefix_caching"),
        message="prefix caching with different block sizes ({p.block_size} vs {d.block_size}) "
        "on a Mamba model: 'Prefix caching with heterogeneous physical_blocks_per_logical'",
        fix="use equal block sizes, or prefixCaching: false on both pools",
        source="vLLM 0.33.0 nixl/base_worker.py L2765-2777",
    ),
    Rule(
        id="SSM-SPEC-UNVALIDATED", severity=WARN, families=frozenset({"hybrid-ssm"}),
        summary="Speculative decoding with hybrid SSM models is not validated upstream.",
        when=either_pool(lambda x: x.speculative is not None),
        fields=("p.speculative",),
        message="speculative decoding with a hybrid SSM model is marked unknown upstream",
        fix="validate in staging, or disable speculation",
        source=f"{MATRIX_PAGE} (Hybrid SSM x Spec Decode: unknown)",
    ),
    Rule(
        id="KV-SCALES-DYNAMIC", severity=REJECT, checklist="D25",
        summary="Dynamic KV scales are computed per instance and never transferred.",
        when=either_pool(lambda x: x.kv_cache_scales == "dynamic"
                         or x.has_arg("--calculate-kv-scales")),
        fields=("p.kv_cache_scales", "d.kv_cache_scales", "p.args", "d.args"),
        message="dynamic KV-cache scales (kvCacheScales dynamic or --calculate-kv-scales): P and "
        "D compute different scales and NIXL does not carry them",
        fix="use static scales from the checkpoint (kvCacheScales: static)",
        source=f"{MATRIX_PAGE} (Quantized KV cache: dynamic not supported)",
    ),
    Rule(
        id="KV-SCALES-UNQUANTIZED", severity=REJECT,
        summary="kvCacheScales other than static needs a quantized kv-cache dtype.",
        when=either_pool(lambda x: x.kv_cache_scales != "static" and not x.is_quantized_kv),
        fields=("p.kv_cache_scales", "p.kv_cache_dtype"),
        message="kvCacheScales {p.kv_cache_scales} with kvCacheDtype {p.kv_cache_dtype}: scales "
        "only exist for a quantized KV cache",
        fix="remove kvCacheScales or set a quantized kvCacheDtype (e.g. fp8)",
        source=f"{MATRIX_PAGE} (Quantized KV cache)",
    ),
    Rule(
        id="KV-QUANTIZED", severity=WARN, checklist="D25",
        summary="Quantized KV support depends on the attention backend.",
        when=either_pool(lambda x: x.is_quantized_kv and x.kv_cache_scales != "dynamic"),
        fields=("p.kv_cache_dtype",),
        message="quantized KV cache {p.kv_cache_dtype}: static scales are loaded by each side from "
        "the checkpoint; support is backend-dependent upstream (vllm-project/vllm#42179)",
        fix="load both pools from the same checkpoint and validate the pairing once",
        source=f"{MATRIX_PAGE} (Quantized KV cache); vllm-project/vllm#33702",
    ),
    # ---------------------------------------------------------------- E. runtime and environment
    Rule(
        id="SIDE-CHANNEL-HOST", severity=REJECT, checklist="E26",
        summary="The side-channel host is the pod IP (the operator sets it).",
        when=either_pool(lambda x: "VLLM_NIXL_SIDE_CHANNEL_HOST" in x.env),
        fields=("p.env", "d.env"),
        message="VLLM_NIXL_SIDE_CHANNEL_HOST is overridden; it must be an address the prefill "
        "pod can bind and decode can reach, which only the pod IP is",
        fix="remove the override; the operator sets it from status.podIP",
        source="vLLM 0.33.0 nixl/base_scheduler.py L296-383; envs.py L1720-1727",
    ),
    Rule(
        id="LAYOUT-ENV", severity=REJECT, checklist="C19",
        summary="The KV layout is set through kvCacheLayout, not VLLM_KV_CACHE_LAYOUT.",
        when=either_pool(lambda x: "VLLM_KV_CACHE_LAYOUT" in x.env),
        fields=("p.env", "d.env"),
        message="VLLM_KV_CACHE_LAYOUT is set in the pool environment, which overrides the "
        "validated kvCacheLayout",
        fix="remove the env var and set kvCacheLayout",
        source="vLLM 0.33.0 v1/attention/backends/utils.py L298-381",
    ),
    Rule(
        id="EXPANDABLE-SEGMENTS", severity=REJECT, checklist="E29",
        summary="PYTORCH_CUDA_ALLOC_CONF must not enable expandable_segments.",
        when=either_pool(lambda x: "expandable_segments:true"
                   in x.env.get("PYTORCH_CUDA_ALLOC_CONF", "").replace(" ", "").lower()),
        fields=("p.env", "d.env"),
        message="PYTORCH_CUDA_ALLOC_CONF enables expandable_segments; remapped pages invalidate "
        "the RDMA registrations of the KV cache",
        fix="remove expandable_segments:True from PYTORCH_CUDA_ALLOC_CONF",
        source="vLLM 0.33.0 config/vllm.py L1270-1300",
    ),
    Rule(
        id="SLEEP-MODE", severity=REJECT, checklist="E30",
        summary="Sleep mode needs the pull connector and exactly the UCX backend.",
        when=either_pool(lambda x: x.has_arg("--enable-sleep-mode")
                   and (x.is_push or x.backends != ("UCX",))),
        fields=("p.args", "d.args", "p.backends", "p.connector"),
        message="--enable-sleep-mode works only with the pull connector and backends [UCX] "
        "(connector {p.connector}, backends {p.backends})",
        fix="drop --enable-sleep-mode, or use NixlConnector with backends [UCX]",
        source="vLLM 0.33.0 nixl/connector.py L371-374; config/vllm.py L1254-1267",
    ),
    Rule(
        id="ROUTED-EXPERTS", severity=REJECT, checklist="E31",
        summary="--enable-return-routed-experts is incompatible with NIXL connectors.",
        when=either_pool(lambda x: x.has_arg("--enable-return-routed-experts")),
        fields=("p.args", "d.args"),
        message="--enable-return-routed-experts cannot be combined with a NIXL connector",
        fix="remove --enable-return-routed-experts",
        source="vLLM 0.33.0 config/vllm.py L1231-1244",
    ),
    Rule(
        id="ARGS-MANAGED", severity=REJECT,
        summary="Extra args must not override fields the operator renders and validates.",
        when=either_pool(lambda x: x.has_arg(*MANAGED_FLAGS)),
        fields=("p.args", "d.args"),
        message="extra args repeat an engine flag the operator renders from the spec "
        "(prefill args {p.args}, decode args {d.args}); the validated value would be overridden",
        fix="set the matching spec field instead (model, dtype, TP/PP/DP, blockSize, "
        "kvCacheDtype, attentionBackend, speculative, kvTransfer)",
        source="pd-operator: the spec is the single source of every hashed value",
    ),
    Rule(
        id="FAILURE-POLICY-RECOMPUTE", severity=WARN, checklist="E35",
        summary="kvLoadFailurePolicy recompute makes decode redo prefills on failures.",
        when=lambda p, d: d.kv_load_failure_policy == "recompute",
        fields=("d.kv_load_failure_policy",),
        message="kvLoadFailurePolicy recompute: failed transfers are recomputed on decode, which "
        "causes decode jitter and hides broken pairings",
        fix="use kvLoadFailurePolicy fail",
        source="vLLM NixlConnector usage guide (kv_load_failure_policy)",
    ),
    Rule(
        id="LEASE-SHORT", severity=WARN, checklist="E36", versions=since(0, 22),
        summary="A short KV lease lets blocks expire before heartbeats start.",
        when=either_pool(lambda x: x.kv_lease_duration_s is not None
                         and x.kv_lease_duration_s < 10),
        fields=("p.kv_lease_duration_s",),
        message="kvLeaseDurationSeconds {p.kv_lease_duration_s} is shorter than router-to-decode "
        "forwarding plus the 5 s handshake timeout; blocks can expire and be reused",
        fix="use at least 10 s (the default is 30 s)",
        source="vLLM 0.33.0 nixl/base_scheduler.py L82-88; base_worker.py L3380-3400",
    ),
    Rule(
        id="LEASE-IGNORED", severity=WARN, versions=until(0, 20),
        summary="Before 0.22 there is no KV lease (a fixed abort timeout applies).",
        when=either_pool(lambda x: x.kv_lease_duration_s is not None),
        fields=("p.kv_lease_duration_s",),
        message="kvLeaseDurationSeconds is ignored by vLLM {p.engine_version}; it uses "
        "VLLM_NIXL_ABORT_REQUEST_TIMEOUT instead",
        fix="remove kvLeaseDurationSeconds, or use vLLM 0.22+",
        source="vLLM 0.22 release (kv_lease_duration replaces the abort timeout)",
    ),
    Rule(
        id="HANDSHAKE-COMPAT-OFF", severity=WARN, checklist="E37",
        summary="Disabling the handshake hash check removes every hash protection.",
        when=either_pool(lambda x: not x.enforce_handshake_compat),
        fields=("p.enforce_handshake_compat",),
        message="enforceHandshakeCompat is false: hash-only differences corrupt KV or crash "
        "instead of failing cleanly",
        fix="leave enforceHandshakeCompat true",
        source="vLLM 0.33.0 nixl/base_worker.py L1037-1040, L1190-1208",
    ),
    Rule(
        id="MODEL-REDIRECT", severity=WARN, checklist="A3",
        summary="VLLM_MODEL_REDIRECT_PATH rewrites the hashed model string.",
        when=either_pool(lambda x: "VLLM_MODEL_REDIRECT_PATH" in x.env),
        fields=("p.env", "d.env"),
        message="VLLM_MODEL_REDIRECT_PATH rewrites the model string before it is hashed; the "
        "predicted hash does not apply",
        fix="start the engine with the final model path in spec.model.name",
        source="vLLM 0.33.0 config/model.py L605",
    ),
)

BY_ID = {r.id: r for r in RULES}
assert len(BY_ID) == len(RULES), "duplicate rule id"
