"""Known vLLM bugs as rules (rules_known_bugs), and what the engine version selects.

Each bug rule is checked on both sides of its version range and of its condition; the version
tests pin the two honesty fixes of issue 11 item 5 (an explicit version contradicting the image
tag, a version older than the oldest known).
"""

from __future__ import annotations

import json

import pytest

from pd_operator.render.engine import kv_transfer_config
from pd_operator.resolve import resolve
from pd_operator.validate import parse_object
from pd_runtime.compat import check_pools, rules_known_bugs
from pd_runtime.compat.rule import REJECT, WARN
from pd_runtime.compat.versions import (
    NIXL_CONNECTOR_VERSION,
    NIXL_REQUIRED,
    image_version_conflict,
    rules_minor,
)
from tests.helpers import LLAMA_8B, sample_pdd

QWEN_MOE = {"name": "Qwen/Qwen3-30B-A3B-Instruct-2507", "family": "moe", "numKVHeads": 4,
            "headSize": 128, "numHiddenLayers": 48}
NEMOTRON_H = {"name": "nvidia/Nemotron-H-8B-Base-8K", "family": "hybrid-ssm", "numKVHeads": 8,
              "headSize": 128, "numHiddenLayers": 52, "mambaType": "mamba2"}
QWEN_NEXT = {"name": "Qwen/Qwen3-Next-80B-A3B-Instruct", "family": "hybrid-ssm",
             "numKVHeads": 2, "headSize": 256, "numHiddenLayers": 48, "mambaType": "gdn"}
GEMMA_SWA = {"name": "google/gemma-2-9b-it", "family": "dense", "numKVHeads": 8,
             "headSize": 256, "numHiddenLayers": 42, "slidingWindow": 4096}


spec = sample_pdd  # spec(version, model, prefill, decode, engine=..., **other spec keys)


def decide(obj: dict):
    parsed = parse_object(obj).spec
    p, d = resolve(parsed)
    return check_pools(p, d, parsed.validation.policy)


def severity_of(decision, rule: str) -> str | None:
    found = [v.severity for v in decision.verdicts if v.rule == rule]
    return found[0] if found else None


# ------------------------------------------------------------------------- the table itself
def test_every_bug_rule_names_an_upstream_source_and_a_fix():
    for rule in rules_known_bugs.RULES:
        assert rule.id.startswith("BUG-")
        assert "#" in rule.source, f"{rule.id}: the source is an issue or PR"
        assert rule.fix and rule.severity in (REJECT, WARN)
    assert len(rules_known_bugs.BY_ID) == len(rules_known_bugs.RULES)


def test_bug_rules_are_in_the_vllm_profile():
    from pd_runtime.compat import profiles

    ids = {r.id for r in profiles.vllm_rules((0, 18), "dense")}
    assert "BUG-TRITON-HND-HETERO-TP" in ids
    assert "BUG-TRITON-HND-HETERO-TP" not in {r.id for r in profiles.vllm_rules((0, 20), "dense")}


# ------------------------------------------------------------------------- one rule at a time
TRITON_HETERO = {"prefill": {"tensorParallelSize": 1, "attentionBackend": "TRITON_ATTN"},
                 "decode": {"tensorParallelSize": 2, "attentionBackend": "TRITON_ATTN"}}


@pytest.mark.parametrize(("version", "expected"), [("0.18.0", REJECT), ("0.19.1", REJECT),
                                                   ("0.20.0", None), ("0.33.0", None)])
def test_triton_hetero_tp_until_0_20(version, expected):
    decision = decide(spec(version, **TRITON_HETERO))
    assert severity_of(decision, "BUG-TRITON-HND-HETERO-TP") == expected


def test_triton_equal_tp_and_flash_attn_hetero_tp_pass():
    equal = decide(spec("0.18.0", prefill={"attentionBackend": "TRITON_ATTN"},
                        decode={"attentionBackend": "TRITON_ATTN"}))
    assert severity_of(equal, "BUG-TRITON-HND-HETERO-TP") is None
    flash = decide(spec("0.18.0", prefill={"tensorParallelSize": 1},
                        decode={"tensorParallelSize": 2}))
    assert flash.accepted and severity_of(flash, "BUG-TRITON-HND-HETERO-TP") is None


def test_auto_backend_with_hetero_tp_warns_before_0_20():
    auto = {"prefill": {"tensorParallelSize": 1, "attentionBackend": "auto"},
            "decode": {"tensorParallelSize": 2, "attentionBackend": "auto"}}
    assert severity_of(decide(spec("0.18.0", **auto)), "BUG-TRITON-HND-HETERO-TP-AUTO") == WARN
    assert severity_of(decide(spec("0.20.0", **auto)), "BUG-TRITON-HND-HETERO-TP-AUTO") is None


@pytest.mark.parametrize(("version", "decode_tp", "expected"), [
    ("0.22.0", 8, REJECT), ("0.23.0", 8, REJECT), ("0.24.0", 8, None), ("0.22.0", 4, None)])
def test_gqa_replicated_decode_tp(version, decode_tp, expected):
    decision = decide(spec(version, model=QWEN_MOE, prefill={"tensorParallelSize": 2},
                           decode={"tensorParallelSize": decode_tp}))
    assert severity_of(decision, "BUG-GQA-REPLICATED-HETERO-TP") == expected
    assert decision.accepted == (expected is None)


def test_gqa_rule_names_the_head_count():
    decision = decide(spec("0.22.0", model=QWEN_MOE, prefill={"tensorParallelSize": 4},
                           decode={"tensorParallelSize": 8}))
    (verdict,) = [v for v in decision.verdicts if v.rule == "BUG-GQA-REPLICATED-HETERO-TP"]
    assert "4 KV heads" in verdict.message and "decode TP <= 4" in verdict.fix
    assert "spec.decode.tensorParallelSize" in verdict.fields


@pytest.mark.parametrize(("version", "model", "expected"), [
    ("0.20.0", GEMMA_SWA, WARN), ("0.29.0", NEMOTRON_H, WARN), ("0.30.0", GEMMA_SWA, None),
    ("0.20.0", LLAMA_8B, None)])
def test_hma_receive_failure_warns_0_18_to_0_29(version, model, expected):
    assert severity_of(decide(spec(version, model=model)), "BUG-HMA-RECV-FAIL-OPEN") == expected


@pytest.mark.parametrize(("lease", "expected"), [(30, WARN), (59, WARN), (60, None),
                                                 (None, None), (5, None)])
def test_short_explicit_lease_warns(lease, expected):
    extra = {"kvTransfer": {"kvLeaseDurationSeconds": lease}} if lease else {}
    decision = decide(spec("0.33.0", **extra))
    assert severity_of(decision, "BUG-LEASE-EXPIRED-READ") == expected


def test_operator_renders_its_own_lease_when_unset():
    p, _ = resolve(parse_object(spec("0.33.0")).spec)
    extra = kv_transfer_config(p)["kv_connector_extra_config"]
    assert extra["kv_lease_duration"] == rules_known_bugs.OPERATOR_KV_LEASE_S
    assert rules_known_bugs.OPERATOR_KV_LEASE_S >= rules_known_bugs.LEASE_WARN_BELOW_S
    set_p, _ = resolve(parse_object(spec("0.33.0", kvTransfer={
        "kvLeaseDurationSeconds": 300})).spec)
    assert kv_transfer_config(set_p)["kv_connector_extra_config"]["kv_lease_duration"] == 300
    old_p, _ = resolve(parse_object(spec("0.20.0")).spec)
    assert "kv_lease_duration" not in json.dumps(kv_transfer_config(old_p))  # no lease before 0.22


@pytest.mark.parametrize(("version", "expected"), [("0.30.0", WARN), ("0.31.0", None)])
def test_peer_restart_warns_before_0_31(version, expected):
    assert severity_of(decide(spec(version)), "BUG-PEER-RESTART") == expected


PREFIX_ON = {"args": ["--enable-prefix-caching"]}


@pytest.mark.parametrize(("version", "model", "decode", "expected"), [
    ("0.19.0", QWEN_NEXT, PREFIX_ON, REJECT),  # GDN: align mode
    ("0.22.0", QWEN_NEXT, PREFIX_ON, REJECT),
    ("0.23.0", QWEN_NEXT, PREFIX_ON, None),  # fixed in 0.23
    ("0.19.0", QWEN_NEXT, {}, None),  # the operator leaves prefix caching off
    ("0.19.0", NEMOTRON_H, PREFIX_ON, None),  # Mamba2 supports 'all' mode
    ("0.19.0", NEMOTRON_H, {"args": ["--enable-prefix-caching", "--mamba-cache-mode=align"]},
     REJECT),
])
def test_mamba_external_kv_assert(version, model, decode, expected):
    decision = decide(spec(version, model=model, decode=decode))
    assert severity_of(decision, "BUG-MAMBA-EXTERNAL-KV") == expected


PREFIX_OFF = {"prefixCaching": False}


@pytest.mark.parametrize(("version", "decode", "expected"), [
    ("0.23.0", PREFIX_ON, REJECT), ("0.26.0", PREFIX_ON, REJECT), ("0.27.0", PREFIX_ON, None),
    ("0.24.0", {}, None),  # vLLM's default: off for hybrid models before 0.26
    ("0.26.0", {}, REJECT),  # on by default from 0.26
    ("0.26.0", PREFIX_OFF, None),  # the operator passes --no-enable-prefix-caching
])
def test_ssm_one_local_block(version, decode, expected):
    decision = decide(spec(version, model=NEMOTRON_H, decode=decode))
    assert severity_of(decision, "BUG-SSM-ONE-LOCAL-BLOCK") == expected


@pytest.mark.parametrize(("version", "prefill", "expected"), [
    ("0.22.0", PREFIX_ON, WARN), ("0.25.0", {}, None), ("0.27.0", {}, WARN),
    ("0.28.0", PREFIX_OFF, None), ("0.29.0", {}, None), ("0.29.0", PREFIX_ON, None)])
def test_mamba_truncation_after_a_prefix_hit(version, prefill, expected):
    decision = decide(spec(version, model=NEMOTRON_H, prefill=prefill, decode=PREFIX_OFF))
    assert severity_of(decision, "BUG-MAMBA-TRUNCATE-PREFIX-HIT") == expected


def test_hybrid_kernel_block_warns_on_unequal_tp():
    hetero = decide(spec("0.33.0", model=NEMOTRON_H, prefill={"tensorParallelSize": 1},
                         decode={"tensorParallelSize": 2}))
    assert severity_of(hetero, "BUG-HYBRID-KERNEL-BLOCK") == WARN and hetero.accepted
    assert severity_of(decide(spec("0.33.0", model=NEMOTRON_H)), "BUG-HYBRID-KERNEL-BLOCK") is None


def test_speculation_on_a_hybrid_decode_warns():
    mtp = {"speculative": {"method": "mtp", "numSpeculativeTokens": 1}}
    hybrid = decide(spec("0.33.0", model=NEMOTRON_H, prefill=mtp, decode=mtp))
    dense = decide(spec("0.33.0", prefill=mtp, decode=mtp))
    assert severity_of(hybrid, "BUG-SSM-SPEC-TRANSFER") == WARN
    assert severity_of(dense, "BUG-SSM-SPEC-TRANSFER") is None


def test_fp8_kv_on_hybrid_warns():
    fp8 = {"kvCacheDtype": "fp8"}
    hybrid = decide(spec("0.33.0", model=NEMOTRON_H, prefill=fp8, decode=fp8))
    dense = decide(spec("0.33.0", prefill=fp8, decode=fp8))
    assert severity_of(hybrid, "BUG-FP8-KV-HYBRID") == WARN
    assert severity_of(dense, "BUG-FP8-KV-HYBRID") is None


# ------------------------------------------------------------------------- versions
def test_explicit_version_contradicting_the_image_is_rejected_with_both_values():
    """Issue 11: image v0.13.0 + version 0.33.0 + TP 4 -> 1 was accepted."""
    decision = decide(spec("0.13.0", engine={"version": "0.33.0"},
                           prefill={"tensorParallelSize": 4}, decode={"tensorParallelSize": 1}))
    assert not decision.accepted
    (verdict,) = [v for v in decision.verdicts if v.rule == "ENGINE-VERSION-IMAGE-CONFLICT"]
    assert "0.33.0" in verdict.message and "v0.13.0" in verdict.message
    assert set(verdict.fields) == {"spec.engine.version", "spec.engine.image"}


def test_version_agreeing_with_the_tag_or_no_version_tag_passes():
    same = decide(spec("0.33.0", engine={"version": "0.33.0"}))
    suffixed = decide(spec("0.33.0-cu130", engine={"version": "0.33.0"}))
    latest = decide({**spec("0.33.0"), "spec": {**spec("0.33.0")["spec"], "engine": {
        "image": "vllm/vllm-openai:latest", "version": "0.33.0"}}})
    for decision in (same, suffixed, latest):
        assert decision.accepted and severity_of(decision, "ENGINE-VERSION-IMAGE-CONFLICT") is None


def test_per_pool_version_override_contradicting_its_image_is_rejected():
    obj = spec("0.33.0", decode={"engine": {"image": "vllm/vllm-openai:v0.13.0",
                                            "version": "0.33.0"}})
    decision = decide(obj)
    (verdict,) = [v for v in decision.verdicts if v.rule == "ENGINE-VERSION-IMAGE-CONFLICT"]
    assert "spec.decode.engine.version" in verdict.fields
    assert "spec.decode.engine.image" in verdict.fields


def test_version_older_than_known_gets_the_oldest_rules_and_says_so():
    """Issue 11: version 0.1.0 got the newest rules with only a generic warning."""
    decision = decide(spec("0.1.0", prefill={"tensorParallelSize": 4},
                           decode={"tensorParallelSize": 1}))
    assert decision.rules_version.startswith("vllm 0.11") and "older" in decision.rules_version
    (verdict,) = [v for v in decision.verdicts if v.rule == "ENGINE-VERSION-TOO-OLD"]
    assert "0.1.0" in verdict.message and "0.11 rules are applied" in verdict.message
    assert severity_of(decision, "ENGINE-VERSION-UNKNOWN") is None
    # the 0.11 rules know that old releases refuse P TP > D TP
    assert "TP-PREFILL-GT-DECODE" in {v.rule for v in decision.rejections}


def test_newer_and_missing_versions_still_get_the_newest_rules():
    assert rules_minor("0.40.1").minor == (0, 33) and rules_minor("0.40.1").position == "newer"
    assert rules_minor(None).position == "missing" and rules_minor("0.33.0").position == "known"
    assert rules_minor("0.9.2").minor == (0, 11)


def test_image_version_conflict_helper():
    assert image_version_conflict("vllm/vllm-openai:v0.13.0", "0.33.0") == "0.13.0"
    assert image_version_conflict("vllm/vllm-openai:v0.33.0", "0.33.0") is None
    assert image_version_conflict("vllm/vllm-openai:v0.33.1", "0.33.0") == "0.33.1"
    assert image_version_conflict("vllm/vllm-openai@sha256:" + "a" * 64, "0.33.0") is None
    assert image_version_conflict("vllm/vllm-openai:v0.33.0", None) is None


def test_connector_versions_and_nixl_requirement_of_0_33():
    assert NIXL_CONNECTOR_VERSION[(0, 33)] == 15
    assert {m: NIXL_CONNECTOR_VERSION[m] for m in ((0, 25), (0, 27), (0, 29), (0, 31))} == {
        (0, 25): 4, (0, 27): 5, (0, 29): 9, (0, 31): 13}
    assert NIXL_REQUIRED[(0, 33)] == "1.5.0"
    # a 0.31 pair now gets a predicted hash (its connector version is known)
    assert decide(spec("0.31.0")).prefill_hash is not None
