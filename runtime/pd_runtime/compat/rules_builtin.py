"""The bundled runtime's profile: the newest vLLM rules, minus what the runtime's transfer planner
handles itself, plus rules for what it does not do. The limits come from
pd_runtime.capabilities (pure data, tested against the planner), so `pdctl check`, the
runtime's handshake and `pd-runtime transfer-test` agree."""

from __future__ import annotations

from functools import cache

from .. import capabilities
from . import rules_vllm
from .pool import ResolvedPool as Pool
from .rule import REJECT, Rule
from .rules_vllm import either_pool
from .versions import NEWEST_KNOWN

CAPS = capabilities.CAPABILITIES
SOURCE = "pd-runtime capabilities (runtime/pd_runtime/capabilities.py)"

LIFTED: frozenset[str] = frozenset({
    # the token-granular planner maps any TP pair and any block sizes, in either direction
    "TP-DIVISIBLE", "TP-EXCEEDS-KV-HEADS", "BLOCK-DIVISIBLE", "BLOCK-HOST-BUFFER",
    "BLOCK-HETERO-TP-MERGE", "BLOCK-HETERO", "BLOCK-HMA",
    # the gather/scatter kernels permute between HND and NHD, no flag needed
    "LAYOUT-MATCH", "LAYOUT-PERMUTE-EXPERIMENTAL", "PERMUTE-HMA", "HETERO-TP-LAYOUT",
    # scales travel with the data (their own region), so dynamic scales are safe
    "KV-SCALES-DYNAMIC", "KV-QUANTIZED",
    # vLLM-only settings: attention backends, HMA, cross-layer blocks, vLLM env vars and flags
    "ATTN-BACKEND-MATCH", "ATTN-BACKEND-AUTO", "HMA-MATCH", "CROSS-LAYER-MATCH",
    "CROSS-LAYER-REQUIREMENTS", "CROSS-LAYER-SSM", "CROSS-LAYER-REMOVED",
    "CROSS-LAYER-UNAVAILABLE", "SSM-CONV-LAYOUT", "SSM-HMA-OFF", "SSM-PREFIX-BLOCKS",
    "SSM-MAMBA-TYPE", "SLEEP-MODE", "ROUTED-EXPERTS",
    "ARGS-MANAGED", "MODEL-REDIRECT", "LAYOUT-ENV", "SIDE-CHANNEL-HOST",
    # replaced by the BUILTIN-* rules below (the runtime has none of these features)
    "SPEC-MATCH", "SPEC-MTP-TOKENS", "SSM-SPEC-UNVALIDATED", "DECODE-PP", "PREFILL-PP-PULL",
    "PREFILL-PP-MAMBA", "MULTIMODAL-UNVALIDATED", "ENCDEC-UNSUPPORTED",
})


def _heads(x: Pool) -> int:
    return 1 if x.is_mla else x.num_kv_heads


def _tp_misfit(x: Pool) -> bool:
    return not capabilities.tp_fits_heads(x.tp, _heads(x))


RULES: tuple[Rule, ...] = (
    Rule(
        id="BUILTIN-FAMILY", severity=REJECT,
        summary="The runtime moves KV for " + ", ".join(CAPS["families"]) + " models.",
        when=either_pool(lambda x: x.family not in CAPS["families"]),
        fields=("p.family",),
        message="the builtin runtime does not move KV for {p.family} models",
        fix="use engine.type vllm for this model, or one of: " + ", ".join(CAPS["families"]),
        source=SOURCE,
    ),
    Rule(
        id="BUILTIN-TP-HEADS", severity=REJECT,
        summary="Each pool's TP divides the KV head count or is a multiple of it.",
        when=either_pool(_tp_misfit),
        fields=("p.tp", "d.tp", "p.num_kv_heads"),
        message="prefill TP {p.tp} / decode TP {d.tp} with {p.num_kv_heads} KV heads: a TP that "
        "neither divides the head count nor is a multiple of it splits a head across ranks",
        fix="choose TP sizes that divide the KV head count (or are multiples of it)",
        source=SOURCE,
    ),
    Rule(
        id="BUILTIN-DTYPE", severity=REJECT,
        summary="Model dtype " + " or ".join(CAPS["model_dtypes"]) + ".",
        when=either_pool(lambda x: x.dtype not in CAPS["model_dtypes"]),
        fields=("p.dtype", "d.dtype"),
        message="the builtin runtime serves {p.dtype} / {d.dtype} models only as "
        + " or ".join(CAPS["model_dtypes"]),
        fix="set spec.model.dtype to " + " or ".join(CAPS["model_dtypes"]),
        source=SOURCE,
    ),
    Rule(
        id="BUILTIN-KV-DTYPE", severity=REJECT,
        summary="KV-cache dtypes: " + ", ".join(CAPS["kv_cache_dtypes"]) + ".",
        when=either_pool(lambda x: x.kv_cache_dtype not in CAPS["kv_cache_dtypes"]),
        fields=("p.kv_cache_dtype", "d.kv_cache_dtype"),
        message="kvCacheDtype {p.kv_cache_dtype} / {d.kv_cache_dtype} is not one the builtin "
        "runtime moves",
        fix="use one of: " + ", ".join(CAPS["kv_cache_dtypes"]),
        source=SOURCE,
    ),
    Rule(
        id="BUILTIN-PARALLELISM", severity=REJECT,
        summary="No pipeline or decode-context parallelism in the runtime.",
        when=either_pool(lambda x: x.pp > 1 or x.dcp > 1),
        fields=("p.pp", "d.pp", "p.dcp", "d.dcp"),
        message="pipelineParallelSize {p.pp}/{d.pp} and decodeContextParallelSize {p.dcp}/{d.dcp}: "
        "the builtin runtime runs one rank per TP rank only",
        fix="set pipelineParallelSize and decodeContextParallelSize to 1",
        source=SOURCE,
    ),
    Rule(
        id="BUILTIN-SPECULATIVE", severity=REJECT,
        summary="No speculative decoding in the runtime.",
        when=either_pool(lambda x: x.speculative is not None),
        fields=("p.speculative", "d.speculative"),
        message="the builtin runtime does not move draft-model KV (speculative decoding)",
        fix="remove speculative, or use engine.type vllm",
        source=SOURCE,
    ),
    Rule(
        id="BUILTIN-TRANSPORT", severity=REJECT,
        summary="Pull connector over UCX only.",
        when=either_pool(lambda x: x.connector not in CAPS["connectors"] + ["NixlPullConnector"]
                     or list(x.backends) != CAPS["backends"]),
        fields=("p.connector", "p.backends"),
        message="connector {p.connector} with backends {p.backends}: the builtin runtime pulls "
        "over UCX only",
        fix="use connector NixlConnector and backends [UCX]",
        source=SOURCE,
    ),
)


@cache
def rules_for(family: str) -> tuple[Rule, ...]:
    inherited = tuple(
        r for r in rules_vllm.RULES
        if r.applies_to(family, NEWEST_KNOWN) and r.id not in LIFTED
    )
    return inherited + tuple(r for r in RULES if r.applies_to(family, NEWEST_KNOWN))
