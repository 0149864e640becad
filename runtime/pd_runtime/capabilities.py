"""What the bundled runtime (engine.type: builtin) can transfer: pure data, no imports beyond the
standard library, so the operator's compat rules (builtin profile) can read it.

The planner (pd_runtime.planner) is token-granular and plans per head, so the only real limits
are that each side's TP fits its own head count, and that both sides run the same model and
cache dtype (those are hash factors). Everything in here is exercised by tests/unit/runtime
(property test against the brute-force reference) and tests/integration/runtime (NIXL, byte-exact).
"""

from __future__ import annotations

CAPABILITIES: dict = {
    "runtime": "pd-runtime",
    "protocol_version": 1,
    # model families whose KV the runtime moves; "moe" moves like "dense". Sliding-window models
    # are "dense" (or "moe") with slidingWindow > 0: only the live window is moved.
    "families": ["dense", "moe", "mla", "hybrid-ssm"],
    "sliding_window": True,
    # TP: any pair, in both directions (head split, head merge, non-divisible pairs such as 2 -> 3
    # with 6 heads), as long as EACH side's TP either divides the KV head count or is a multiple
    # of it (then heads are replicated; one source per head is read, the other replicas get a
    # release notification). MLA latents are replicated and read once per decode rank.
    "tp": {
        "directions": ["equal", "prefill_smaller", "prefill_larger"],
        "pair_divisibility_required": False,
        "per_side": "tp divides num_kv_heads, or num_kv_heads divides tp",
        "replicated_kv_prefill_larger": True,  # vLLM rejects P_TP > D_TP with P_TP > heads
    },
    # block sizes: any two positive sizes (token-granular remap), including prefill > decode
    "block_size": {"relation": "any", "min": 1},
    # layouts: every pair, with no flag (the gather/scatter kernels permute); aliases accepted
    "layouts": ["HND", "NHD"],
    "layout_aliases": {"LBHNC": "HND", "LBNHC": "NHD"},
    "layout_pairs": [["HND", "HND"], ["HND", "NHD"], ["NHD", "HND"], ["NHD", "NHD"]],
    "needs_enable_permute_local_kv": False,
    # model dtypes, and KV cache dtypes: must be equal on both sides (hash factor)
    "model_dtypes": ["bfloat16", "float16"],
    "kv_cache_dtypes": ["auto", "bfloat16", "float16", "fp8", "fp8_e4m3", "fp8_e5m2"],
    "kv_cache_dtype_must_match": True,
    # fp8 caches carry per-token-head float32 scales (k_scale, v_scale) as their own region,
    # moved with the data; "static" per-tensor scales are loaded by each side from the checkpoint
    "kv_cache_scales": ["static", "dynamic", "packed"],
    "buffer_devices": ["cuda", "cpu"],
    "connectors": ["NixlConnector"],  # pull: decode READs
    "backends": ["UCX"],
    "pipeline_parallel": False,  # PP > 1 is not planned (one rank per TP rank only)
    "speculative_decoding": False,  # draft-model KV is not moved
    "hybrid_kv_cache_manager": "any",  # groups have their own block tables here
}


def tp_fits_heads(tp: int, num_kv_heads: int) -> bool:
    """The per-side TP condition of CAPABILITIES['tp']['per_side']."""
    if tp < 1 or num_kv_heads < 1:
        return False
    return num_kv_heads % tp == 0 if tp <= num_kv_heads else tp % num_kv_heads == 0


def unsupported(prefill: dict, decode: dict) -> list[str]:
    """Reasons (empty when supported) for a pairing given as plain dicts with keys family,
    num_kv_heads, tp, block_size, layout, kv_cache_dtype, dtype, pp (optional), model (optional).
    Used by `pd-runtime transfer-test` when pd_runtime.compat has no check_pools."""
    caps = CAPABILITIES
    out = []
    for side, s in (("prefill", prefill), ("decode", decode)):
        fam = s.get("family", "dense")
        if fam not in caps["families"] and fam != "sliding":
            out.append(f"{side}: family {fam!r} is not supported by the builtin runtime")
        heads = 1 if fam == "mla" else int(s.get("num_kv_heads", 1))
        if not tp_fits_heads(int(s.get("tp", 1)), heads):
            out.append(f"{side}: TP {s.get('tp')} neither divides nor is a multiple of "
                       f"{heads} KV heads")
        if int(s.get("block_size", 16)) < caps["block_size"]["min"]:
            out.append(f"{side}: block size must be >= 1")
        lay = caps["layout_aliases"].get(s.get("layout", "HND"), s.get("layout", "HND"))
        if lay not in caps["layouts"]:
            out.append(f"{side}: layout {s.get('layout')!r} is not supported")
        if s.get("kv_cache_dtype", "auto") not in caps["kv_cache_dtypes"]:
            out.append(f"{side}: kv cache dtype {s.get('kv_cache_dtype')!r} is not supported")
        if s.get("dtype", "bfloat16") not in caps["model_dtypes"]:
            out.append(f"{side}: model dtype {s.get('dtype')!r} is not supported")
        if int(s.get("pp", 1)) != 1:
            out.append(f"{side}: pipeline parallel size must be 1")
    for key in ("family", "num_kv_heads", "kv_cache_dtype", "dtype", "model"):
        if prefill.get(key) != decode.get(key):
            out.append(f"{key} differs between prefill ({prefill.get(key)!r}) and decode "
                       f"({decode.get(key)!r})")
    return out
