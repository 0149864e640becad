"""Known vLLM bugs as rules: failures that reading vLLM's rules would not predict.

Each rule's source is an upstream issue or PR (vllm-project/vllm unless another repository is
named), not vLLM's own checks; each carries the affected range, the fix and the first release
with it. A bug that fails every time on the matching spec is a rejection; one that depends on
load, timing or a failure elsewhere is a warning. Ranges were checked against the PyPI wheels
where the text says "wheels" (research notes: shared/reference/vllm-known-bugs.md).

Where the operator avoids a bug itself, the rule says how:
- the lease: when kvLeaseDurationSeconds is unset the operator renders OPERATOR_KV_LEASE_S
  (not vLLM's 30 s) from 0.22 on;
- hybrid-model prefix caching: vLLM leaves it off for hybrid models before 0.26 (0.20-0.25
  wheels: is_prefix_caching_supported) and the operator never passes --enable-prefix-caching;
  from 0.26 it is on by default, and `prefixCaching: false` makes the operator pass
  --no-enable-prefix-caching.
"""

from __future__ import annotations

from .pool import ResolvedPool as Pool
from .rule import REJECT, WARN, Rule
from .versions import between, rules_minor, since, until

# The KV lease the operator renders when the spec leaves it unset (vLLM 0.22+; vLLM's own default
# is 30 s). It has to cover the router-to-decode queue plus the first, cold handshake; a longer
# lease only costs prefill KV space when a decode dies holding blocks.
OPERATOR_KV_LEASE_S = 120
LEASE_WARN_BELOW_S = 60  # below this an explicit lease is short for large models under load
NON_MLA = frozenset({"dense", "moe", "multimodal", "encoder-decoder"})
PREFIX_CACHING_ON = "--enable-prefix-caching"
PREFIX_CACHING_OFF = "--no-enable-prefix-caching"
HYBRID_PREFIX_CACHING_DEFAULT_SINCE = (0, 26)  # wheels: "Generative hybrid models support ..."


def _arg_value(x: Pool, flag: str) -> str | None:
    """The value of `flag` in the pool's extra args (`--flag v` or `--flag=v`), else None."""
    args = list(x.args)
    for i, arg in enumerate(args):
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
    return None


def _hybrid_prefix_caching(x: Pool) -> bool:
    """Prefix caching really on for a hybrid model: the args decide when they say; else the
    spec's prefixCaching, which only turns it on where vLLM's default does (0.26+)."""
    if not x.is_hybrid_ssm or x.has_arg(PREFIX_CACHING_OFF):
        return False
    if x.has_arg(PREFIX_CACHING_ON):
        return True
    return x.prefix_caching \
        and rules_minor(x.engine_version).minor >= HYBRID_PREFIX_CACHING_DEFAULT_SINCE


def _mamba_align_mode(x: Pool) -> bool:
    """vLLM picks mamba_cache_mode 'align' for GDN models and whenever speculation is on
    (0.20 wheel: MambaModelConfig.verify_and_update_config), or when the args ask for it."""
    asked = _arg_value(x, "--mamba-cache-mode")
    if asked is not None:
        return asked == "align"
    return x.mamba_type == "gdn" or x.speculative is not None


def _hetero_tp(p: Pool, d: Pool) -> bool:
    return p.tp != d.tp


def _uses_triton(x: Pool) -> bool:
    return x.attention_backend == "TRITON_ATTN"


def _explicit_lease_short(x: Pool) -> bool:
    lease = x.kv_lease_duration_s
    return lease is not None and 10 <= lease < LEASE_WARN_BELOW_S


def _fp8_kv(x: Pool) -> bool:
    return x.kv_cache_dtype.startswith("fp8")


RULES: tuple[Rule, ...] = (
    Rule(
        id="BUG-TRITON-HND-HETERO-TP", severity=REJECT, versions=until(0, 19),
        families=NON_MLA,
        summary="Up to 0.19 TRITON_ATTN ignores HND, so heterogeneous TP reads the wrong bytes.",
        when=lambda p, d: _hetero_tp(p, d) and (_uses_triton(p) or _uses_triton(d)),
        fields=("p.attention_backend", "d.attention_backend", "p.tp", "d.tp"),
        message="attention backend TRITON_ATTN with prefill TP {p.tp} and decode TP {d.tp} on "
        "vLLM {p.engine_version}: both sides report HND but Triton keeps NHD strides, so the "
        "head split reads the wrong bytes; HTTP 200 with garbage output (gsm8k 0)",
        fix="pin attentionBackend FLASH_ATTN (or FLASHINFER) on both pools, use equal TP, or "
        "use vLLM 0.20+ (PR #37940)",
        source="vllm-project/vllm#37703, #37333; root cause PR #35444; fixed by PR #37940 in "
        "0.20.0 (wheels: triton_attn.py has no HND branch in 0.19.1, honours "
        "get_kv_cache_layout() in 0.20.0)",
    ),
    Rule(
        id="BUG-TRITON-HND-HETERO-TP-AUTO", severity=WARN, versions=until(0, 19),
        families=NON_MLA,
        summary="Up to 0.19 an auto backend may resolve to TRITON_ATTN under heterogeneous TP.",
        when=lambda p, d: _hetero_tp(p, d)
        and "auto" in (p.attention_backend, d.attention_backend),
        fields=("p.attention_backend", "d.attention_backend", "p.tp", "d.tp"),
        message="attentionBackend auto with prefill TP {p.tp} and decode TP {d.tp} on vLLM "
        "{p.engine_version}: where vLLM picks TRITON_ATTN (the ROCm default; some models such "
        "as Gemma-3 on CUDA) the head split reads NHD bytes as HND and output is garbage",
        fix="pin attentionBackend FLASH_ATTN (or FLASHINFER) on both pools, or use vLLM 0.20+",
        source="vllm-project/vllm#37333 (auto-picked Triton, Gemma-3); fixed by PR #37940 "
        "in 0.20.0",
    ),
    Rule(
        id="BUG-GQA-REPLICATED-HETERO-TP", severity=REJECT, versions=until(0, 23),
        families=frozenset({"dense", "moe", "multimodal"}),
        summary="Up to 0.23 decode TP above the KV head count fails the hetero-TP handshake.",
        when=lambda p, d: d.tp > p.tp and d.tp > d.num_kv_heads,
        fields=("p.tp", "d.tp", "d.num_kv_heads"),
        message="decode TP {d.tp} is above prefill TP {p.tp} and above the model's "
        "{d.num_kv_heads} KV heads: decode replicates heads, so its block length stops "
        "scaling with TP, and vLLM {p.engine_version} asserts 'Remote P worker KV layer cache "
        "must be of shape [2, N, local_kv_heads*tp_ratio, ...]' at the first handshake",
        fix="use decode TP <= {d.num_kv_heads} (the KV head count), or vLLM 0.24+",
        source="vllm-project/vllm#45330; fixed by PR #45879 in 0.24.0 (wheels: the tp_ratio "
        "assert is in 0.22/0.23 nixl/worker.py, the per-rank head ratio in 0.24 base_worker.py)",
    ),
    Rule(
        id="BUG-HMA-RECV-FAIL-OPEN", severity=WARN, versions=between((0, 18), (0, 29)),
        summary="0.18-0.29: a failed KV receive on an HMA model returns corrupted tokens.",
        when=lambda p, d: d.hma_required and d.hma,
        fields=("d.sliding_window", "d.family"),
        message="a sliding-window or hybrid model on vLLM {d.engine_version}: when a NIXL read "
        "fails (a peer restart, a stale block list, an unsupported block ratio) decode keeps "
        "generating from invalid KV and answers HTTP 200 with corrupted tokens or the previous "
        "prompt's answer, although kvLoadFailurePolicy is fail",
        fix="use vLLM 0.30+ (PR #52232 fails closed); until then keep equal block sizes and "
        "watch vllm:nixl_num_failed_transfers",
        source="vllm-project/vllm#52234 (seen on 0.24.0, 0.27.2rc1, 0.29.0), #52276; fixed by "
        "PR #52232 in 0.30.0",
    ),
    Rule(
        id="BUG-LEASE-EXPIRED-READ", severity=WARN, versions=since(0, 22),
        summary="A KV lease shorter than queue plus cold handshake serves freed blocks.",
        when=lambda p, d: _explicit_lease_short(p),  # prefill holds the blocks for the lease
        fields=("p.kv_lease_duration_s",),
        message="kvLeaseDurationSeconds {p.kv_lease_duration_s}: when the router-to-decode "
        "queue plus the first (cold) handshake outlasts the lease, prefill reuses the blocks and "
        "decode still reads them: HTTP 200 with wrong output, and prefill only logs 'Potentially "
        "invalid KV blocks ... may have expired' (8 of 42 requests on a 550B model)",
        fix=f"leave kvLeaseDurationSeconds unset (the operator renders {OPERATOR_KV_LEASE_S} s) "
        "or set it higher; use 300 s for models of several hundred billion parameters, and "
        "alert on vllm:nixl_num_kv_expired_reqs",
        source="aws-samples/aws-do-eks PR #84; vllm-project/vllm#52234; unfixed in 0.33.0 "
        "(pull_worker.py logs and continues)",
    ),
    Rule(
        id="BUG-PEER-RESTART", severity=WARN, versions=until(0, 30),
        summary="Before 0.31 a restarted peer at the same address crashes or hangs the other.",
        when=lambda p, d: True,
        fields=("p.engine_version",),
        message="vLLM {p.engine_version}: after a prefill pod restarts at the same address, "
        "decode can segfault in NIXL loadRemoteMD; after a decode restart, requests can hang "
        "with NIXL_ERR_REMOTE_DISCONNECT",
        fix="use vLLM 0.31+ (replaced peers are evicted by address; 0.32 also recovers "
        "invalidated peers) with NIXL newer than 1.3.2; until then restart the decode pods "
        "after any prefill restart (the operator does not do it for you)",
        source="vllm-project/vllm#49238; vLLM side fixed by PR #50047 in 0.31.0 and PR #55471 "
        "in 0.32.0; NIXL fix merged after 1.3.2",
    ),
    Rule(
        id="BUG-MAMBA-EXTERNAL-KV", severity=REJECT, versions=until(0, 22),
        families=frozenset({"hybrid-ssm"}),
        summary="Up to 0.22 a hybrid model with prefix caching in align mode dies on the first "
        "transferred request.",
        when=lambda p, d: _hybrid_prefix_caching(d) and _mamba_align_mode(d),
        fields=("d.args", "d.mamba_type", "d.speculative"),
        message="decode runs prefix caching ({d.args}) for a hybrid model whose Mamba cache "
        "mode is align (GDN, or speculation on): every transferred request carries external "
        "tokens and vLLM {d.engine_version} asserts 'External KV connector is not verified yet' "
        "in the scheduler, killing EngineCore on the first request",
        fix="remove --enable-prefix-caching from the decode args (the operator leaves it off "
        "for hybrid models), or use vLLM 0.23+",
        source="vllm-project/vllm#43508 (0.19.0), #45268, #45407; fixed by PRs #42554 and "
        "#44599 in 0.23.0 (wheels: the assert is in 0.22 scheduler.py, gone in 0.23)",
        unless=("SSM-UNSUPPORTED",),
    ),
    Rule(
        id="BUG-SSM-ONE-LOCAL-BLOCK", severity=REJECT, versions=between((0, 23), (0, 26)),
        families=frozenset({"hybrid-ssm"}),
        summary="0.23-0.26: a hybrid decode with prefix caching crashes on a cache hit.",
        when=lambda p, d: _hybrid_prefix_caching(d),
        fields=("d.prefix_caching", "d.args"),
        message="decode runs prefix caching on a hybrid model (on by default from 0.26; args "
        "{d.args}): a transferred request that hits decode's prefix cache asserts 'SSM can only "
        "have one local block' in the NIXL worker and the decode engine dies (any shared prompt "
        "prefix triggers it)",
        fix="set prefixCaching: false on decode (the operator then passes "
        "--no-enable-prefix-caching) and drop --enable-prefix-caching from its args, or use "
        "vLLM 0.27+",
        source="ai-dynamo/dynamo#12197 (Nemotron-3-Super, TP4/TP4); wheels: the assert is in "
        "nixl/base_worker.py of 0.24 and 0.26, gone in 0.27.0",
    ),
    Rule(
        id="BUG-MAMBA-TRUNCATE-PREFIX-HIT", severity=WARN, versions=between((0, 22), (0, 28)),
        families=frozenset({"hybrid-ssm"}),
        summary="0.22-0.28: a repeated prompt can crash a hybrid prefill with prefix caching.",
        when=lambda p, d: _hybrid_prefix_caching(p),
        fields=("p.prefix_caching", "p.args"),
        message="prefill runs prefix caching on a hybrid model (on by default from 0.26; args "
        "{p.args}): vLLM drops the last prompt token after the local cache lookup, so a repeated "
        "prompt whose cached prefix covers the rest leaves nothing to schedule and prefill's "
        "EngineCore dies on 'assert num_new_tokens > 0' (HTTP 500, pod restart); prompts one "
        "token past a block boundary trigger it",
        fix="set prefixCaching: false on prefill (the operator then passes "
        "--no-enable-prefix-caching), or use vLLM 0.29+",
        source="vllm-project/vllm#53514 (0.27.0), #53706 (0.28.0rc2); fixed by PR #53523 in "
        "0.29.0 (wheels: truncation in get_num_new_matched_tokens up to 0.28, in "
        "on_new_request from 0.29)",
    ),
    Rule(
        id="BUG-HYBRID-KERNEL-BLOCK", severity=WARN, versions=since(0, 20),
        families=frozenset({"hybrid-ssm"}),
        summary="A hybrid model's kernel block size depends on TP: unequal TP can mismatch.",
        when=_hetero_tp,
        fields=("p.tp", "d.tp", "p.block_size", "d.block_size"),
        message="hybrid model with prefill TP {p.tp} and decode TP {d.tp}: vLLM aligns the "
        "attention block size to the per-rank Mamba page size at start-up, so blockSize "
        "{p.block_size}/{d.block_size} may not be what runs and the handshake can fail after "
        "the hash passed (P TP4 vs D TP1: 32 vs 16, gsm8k 0.03)",
        fix="compare the block size each pool logs at start-up, or use equal TP",
        source="vllm-project/vllm#42895 (0.20.2rc1, closed as stale); working as designed in "
        "0.33.0 (model_executor/models/config.py L585-599)",
    ),
    Rule(
        id="BUG-SSM-SPEC-TRANSFER", severity=WARN, families=frozenset({"hybrid-ssm"}),
        summary="MTP/EAGLE speculation on a hybrid decode fails on transferred requests.",
        when=lambda p, d: d.speculative is not None and d.speculative.is_eagle_family,
        fields=("d.speculative",),
        message="decode speculates ({d.speculative.method}) on a hybrid model: a request whose "
        "first decode step arrives over NIXL has no previous-step Mamba state, and the Mamba "
        "mixer asserts on it (Nemotron-3-Super, TP4/TP4); with a KV connector attached, align "
        "mode also corrupted output under speculation (Qwen3.8-27B, 0.27.1); no fix is released",
        fix="disable speculative decoding on both pools for hybrid models, or prove the pairing "
        "under load first",
        source="ai-dynamo/dynamo#12198 (open); vllm-project/vllm#53505 (closed without a fix "
        "named)",
        unless=("SSM-UNSUPPORTED",),
    ),
    Rule(
        id="BUG-FP8-KV-HYBRID", severity=WARN, versions=since(0, 19),
        families=frozenset({"hybrid-ssm"}),
        summary="FP8 KV on a disaggregated hybrid model has corrupted output.",
        when=lambda p, d: _fp8_kv(p) or _fp8_kv(d),
        fields=("p.kv_cache_dtype", "d.kv_cache_dtype"),
        message="kvCacheDtype {p.kv_cache_dtype} on a disaggregated hybrid model: FP8 KV "
        "corrupted output on Qwen3.5-397B (TP4/TP4, 0.19.2rc1); no fix was identified",
        fix="use kvCacheDtype auto (bfloat16) on both pools, or validate output quality first",
        source="vllm-project/vllm#42179 (closed with the workaround); vllm-project/vllm#33702 "
        "(FP8 support is attention-dependent)",
    ),
)

BY_ID = {r.id: r for r in RULES}
