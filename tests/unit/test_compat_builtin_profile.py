"""The builtin profile of the rules and the runtime's capabilities agree on every pairing, so
`pdctl check`, the runtime's handshake and `pd-runtime transfer-test` give one answer."""

from hypothesis import given, settings
from hypothesis import strategies as st

from pd_runtime import capabilities
from pd_runtime.compat import check_pools, make_pool

sides = st.fixed_dictionaries({
    "tp": st.sampled_from([1, 2, 3, 4, 6, 8, 16]),
    "block_size": st.sampled_from([1, 8, 16, 24, 32, 128]),
    "layout": st.sampled_from(["HND", "NHD"]),
    "pp": st.sampled_from([1, 1, 1, 2]),
})
shared = st.fixed_dictionaries({
    "family": st.sampled_from(["dense", "moe", "mla", "hybrid-ssm", "sparse-mla",
                               "multimodal"]),
    "num_kv_heads": st.sampled_from([1, 2, 4, 6, 8, 12]),
    "kv_cache_dtype": st.sampled_from(["auto", "fp8", "fp8_e5m2", "nvfp4"]),
    "dtype": st.sampled_from(["bfloat16", "float16", "float32"]),
})


def as_pool(role, side, common):
    return make_pool(role, family=common["family"], num_kv_heads=common["num_kv_heads"],
                     kv_cache_dtype=common["kv_cache_dtype"], dtype=common["dtype"],
                     tp=side["tp"], block_size=side["block_size"],
                     kv_cache_layout=side["layout"], pp=side["pp"])


@settings(max_examples=400, deadline=None)
@given(shared, sides, sides)
def test_rules_and_capabilities_agree(common, p_side, d_side):
    p_caps = {**common, **p_side}
    d_caps = {**common, **d_side}
    reasons = capabilities.unsupported(p_caps, d_caps)
    decision = check_pools(as_pool("prefill", p_side, common), as_pool("decode", d_side, common))
    assert decision.accepted == (not reasons), (reasons, [v.rule for v in decision.verdicts])


def test_runtime_lifts_vllm_limits():
    p = make_pool("prefill", tp=4, block_size=32, kv_cache_layout="HND")
    d = make_pool("decode", tp=1, block_size=16, kv_cache_layout="NHD")
    assert check_pools(p, d).accepted
    vllm = dict(engine_type="vllm", engine_version="0.33.0")
    rejected = check_pools(make_pool("prefill", tp=4, block_size=32, **vllm),
                           make_pool("decode", tp=1, block_size=16, kv_cache_layout="NHD",
                                     **vllm))
    assert not rejected.accepted
