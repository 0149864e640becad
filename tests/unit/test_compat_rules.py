"""Behaviour of the rule engine on hand-made specs: policies, versions, overrides, field paths."""

import copy

import pytest

from pd_operator.resolve import resolve
from pd_operator.validate import parse_object
from pd_runtime.compat import check_pools
from tests.helpers import sample_pdd

BASE = sample_pdd()


def make(**changes):
    """BASE with dotted-path changes, e.g. make(**{"prefill.tensorParallelSize": 4})."""
    obj = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        node = obj["spec"]
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return obj


def decide(obj):
    spec = parse_object(obj).spec
    p, d = resolve(spec)
    return check_pools(p, d, spec.validation.policy)


def ids(decision, severity=None):
    return {v.rule for v in decision.verdicts if severity in (None, v.severity)}


def test_base_is_accepted_without_warnings():
    decision = decide(BASE)
    assert decision.accepted and decision.verdicts == []


def test_prefill_tp_above_decode_depends_on_version():
    spec = {"prefill.tensorParallelSize": 4, "decode.tensorParallelSize": 1}
    old = decide(make(**spec, **{"engine.image": "vllm/vllm-openai:v0.13.0"}))
    new = decide(make(**spec, **{"engine.image": "vllm/vllm-openai:v0.14.0"}))
    assert "TP-PREFILL-GT-DECODE" in ids(old, "reject") and not old.accepted
    assert new.accepted


def test_rejection_names_fields_fix_and_source():
    decision = decide(make(**{"decode.blockSize": 24}))
    (verdict,) = [v for v in decision.verdicts if v.rule == "BLOCK-DIVISIBLE"]
    assert verdict.fields == ["spec.prefill.blockSize", "spec.decode.blockSize"]
    assert "24" in verdict.message and verdict.fix and verdict.source


def test_per_pool_override_is_named_in_fields():
    decision = decide(make(**{"decode.model": {"name": "/models/llama-3.1-8b"}}))
    (verdict,) = [v for v in decision.verdicts if v.rule == "MODEL-NAME-MATCH"]
    assert verdict.fields == ["spec.model.name", "spec.decode.model.name"]


def test_per_pool_engine_image_takes_its_own_tag():
    decision = decide(make(**{"decode.engine": {"image": "vllm/vllm-openai:v0.32.0"}}))
    (verdict,) = [v for v in decision.verdicts if v.rule == "ENGINE-VERSION-MATCH"]
    assert verdict.fields == ["spec.engine.image", "spec.decode.engine.image"]


def test_fp8_spellings_differ():
    decision = decide(make(**{"prefill.kvCacheDtype": "fp8", "decode.kvCacheDtype": "fp8_e4m3"}))
    assert "KV-DTYPE-MATCH" in ids(decision, "reject")


def test_warn_policy_downgrades_and_disabled_skips():
    bad = {"decode.blockSize": 24}
    warn = decide(make(**bad, **{"validation.policy": "Warn"}))
    assert warn.accepted and "BLOCK-DIVISIBLE" in ids(warn, "warn")
    assert all(v.policy_note for v in warn.verdicts if v.rule == "BLOCK-DIVISIBLE")
    disabled = decide(make(**bad, **{"validation.policy": "Disabled"}))
    assert disabled.accepted and disabled.verdicts == []


def test_unknown_and_missing_versions_warn_and_use_newest_rules():
    unknown = decide(make(**{"engine.image": "vllm/vllm-openai:v0.40.1"}))
    assert "ENGINE-VERSION-UNKNOWN" in ids(unknown, "warn") and unknown.accepted
    assert "newest" in unknown.rules_version
    digest = decide(make(**{"engine.image": "vllm/vllm-openai@sha256:" + "a" * 64}))
    assert "ENGINE-VERSION-MISSING" in ids(digest, "warn") and digest.prefill_hash is None
    pinned = decide(make(**{"engine.image": "vllm/vllm-openai@sha256:" + "a" * 64,
                            "engine.version": "0.32.0"}))
    assert pinned.verdicts == [] and pinned.prefill_hash


def test_superseded_warning_stays_quiet():
    decision = decide(make(**{"decode.blockSize": 24}))
    assert "BLOCK-HETERO" not in ids(decision)
    ok = decide(make(**{"decode.blockSize": 32}))
    assert ids(ok) == {"BLOCK-HETERO"} and ok.accepted


def test_hetero_tp_nhd_rejected_but_permute_allowed():
    nhd = {"prefill.tensorParallelSize": 1, "decode.tensorParallelSize": 2,
           "prefill.kvCacheLayout": "NHD", "decode.kvCacheLayout": "NHD"}
    assert "HETERO-TP-LAYOUT" in ids(decide(make(**nhd)), "reject")
    permute = {"prefill.tensorParallelSize": 1, "decode.tensorParallelSize": 2,
               "decode.kvCacheLayout": "NHD", "kvTransfer.enablePermuteLocalKV": True}
    decision = decide(make(**permute))
    assert decision.accepted and "LAYOUT-PERMUTE-EXPERIMENTAL" in ids(decision, "warn")


def test_mla_ignores_layout_and_heads():
    mla = {"model": {"name": "deepseek-ai/DeepSeek-V3", "family": "mla", "numKVHeads": 1,
                     "headSize": 576, "numHiddenLayers": 61},
           "prefill.tensorParallelSize": 8, "decode.tensorParallelSize": 2}
    assert decide(make(**mla)).accepted


@pytest.mark.parametrize("family,version,rule", [
    ("hybrid-ssm", "0.16.0", "SSM-UNSUPPORTED"),
    ("encoder-decoder", "0.33.0", "ENCDEC-UNSUPPORTED"),
])
def test_family_rules(family, version, rule):
    obj = make(**{"model.family": family, "engine.image": f"vllm/vllm-openai:v{version}"})
    assert rule in ids(decide(obj), "reject")


def test_builtin_engine_uses_its_own_hash():
    obj = make(**{"engine": {"type": "builtin", "image": "ghcr.io/pd-operator/pd-runtime:0.1.0"}})
    decision = decide(obj)
    assert decision.rules_version == "builtin"
    assert decision.prefill_hash and decision.prefill_hash == decision.decode_hash


def test_engine_type_mismatch():
    obj = make(**{"decode.engine": {"type": "builtin", "image": "ghcr.io/x/rt:0.1.0"}})
    assert "ENGINE-TYPE-MATCH" in ids(decide(obj), "reject")
