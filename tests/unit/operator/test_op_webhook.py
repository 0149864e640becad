"""webhook/: the admission decisions (pure) and the HTTPS shell with a generated CA."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import ssl

import aiohttp
import pytest
from op_fixtures import BASE, examples, load, obj

from pd_dev import certs
from pd_operator.webhook import configs, review, server


def _review(op, new, old=None, uid="u-1"):
    req = {"uid": uid, "operation": op, "object": new, "name": new["metadata"]["name"]}
    if old is not None:
        req["oldObject"] = old
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": req}


def _resp(answer):
    assert answer["kind"] == "AdmissionReview"
    return answer["response"]


def test_accept_create_echoes_uid():
    answer, outcome = review.review_validate(_review("CREATE", BASE, uid="abc"))
    r = _resp(answer)
    assert r == {"uid": "abc", "allowed": True}
    assert outcome.allowed


def test_strict_rejection_lists_every_rejecting_rule():
    bad = obj(prefill__tensorParallelSize=3, decode__tensorParallelSize=2,
              decode__kvCacheDtype="fp8")
    r = _resp(review.review_validate(_review("CREATE", bad))[0])
    assert r["allowed"] is False
    msg = r["status"]["message"]
    ids = [v.rule for v in review.validate(_review("CREATE", bad)["request"]).verdicts
           if v.severity == "reject"]
    assert len(ids) >= 2
    for rule in ids:
        assert f"[{rule}]" in msg
    assert "fields: spec." in msg and "fix: " in msg
    assert r["status"]["code"] == 403


def test_warn_policy_admits_with_warnings():
    bad = obj(prefill__tensorParallelSize=3, validation={"policy": "Warn"})
    r = _resp(review.review_validate(_review("CREATE", bad))[0])
    assert r["allowed"] is True
    tp = [w for w in r["warnings"] if w.startswith("TP-DIVISIBLE:")]
    assert tp and "would reject under policy Strict" in tp[0]


def test_warnings_of_accepted_object_come_back():
    o = obj(prefill__blockSize=16, decode__blockSize=32)
    r = _resp(review.review_validate(_review("CREATE", o))[0])
    assert r["allowed"] is True
    assert any(w.startswith("BLOCK-") for w in r["warnings"]), r


def test_schema_error_is_denied_with_paths():
    o = copy.deepcopy(BASE)
    o["spec"]["prefill"]["tensorParallelSize"] = "two"
    r = _resp(review.review_validate(_review("CREATE", o))[0])
    assert r["allowed"] is False and "spec.prefill.tensorParallelSize" in r["status"]["message"]


def test_update_one_pool_hash_change_rejected_both_allowed():
    old = BASE
    one = obj(decode__attentionBackend="FLASHINFER")
    out = review.validate(_review("UPDATE", one, old)["request"])
    assert not out.allowed
    assert review.UPDATE_RULE in out.message
    both = obj(prefill__attentionBackend="FLASHINFER", decode__attentionBackend="FLASHINFER")
    assert review.validate(_review("UPDATE", both, old)["request"]).allowed


def test_update_non_hash_fields_of_one_pool_allowed():
    new = obj(decode__replicas=7, prefill__args=["--max-num-seqs", "8"])
    assert review.validate(_review("UPDATE", new, BASE)["request"]).allowed


def test_update_geometry_of_one_pool_rejected():
    # tensor parallel size is no hash factor, but the running peers planned with it
    new = obj(decode__tensorParallelSize=4)
    out = review.validate(_review("UPDATE", new, BASE)["request"])
    assert not out.allowed and "spec.decode.tensorParallelSize" in out.message


def test_update_one_pool_under_warn_and_disabled():
    warn = obj(decode__attentionBackend="FLASHINFER", validation={"policy": "Warn"})
    old = obj(validation={"policy": "Warn"})
    out = review.validate(_review("UPDATE", warn, old)["request"])
    assert out.allowed and any(review.UPDATE_RULE in w for w in out.warnings)
    off = obj(decode__attentionBackend="FLASHINFER", validation={"policy": "Disabled"})
    assert review.validate(_review("UPDATE", off, old)["request"]).allowed


def test_metadata_only_update_of_rejected_object_is_allowed():
    bad = obj(prefill__tensorParallelSize=3)
    new = copy.deepcopy(bad)
    new["metadata"]["annotations"] = {"x": "y"}
    assert review.validate(_review("UPDATE", new, bad)["request"]).allowed


def test_delete_is_not_judged():
    assert review.validate({"operation": "DELETE", "object": None}).allowed


def _apply_patch(doc, ops):
    doc = copy.deepcopy(doc)
    for op in ops:
        assert op["op"] == "add"
        parts = op["path"].strip("/").split("/")
        node = doc
        for p in parts[:-1]:
            node = node[p]
        assert parts[-1] not in node
        node[parts[-1]] = op["value"]
    return doc


def test_mutation_writes_resolved_defaults():
    answer, _ = review.review_mutate(_review("CREATE", BASE))
    r = _resp(answer)
    assert r["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(r["patch"]))
    out = _apply_patch(BASE, ops)
    assert out["spec"]["engine"]["version"] == "0.33.0"
    assert out["spec"]["kvTransfer"]["sideChannelPort"] == 5600
    assert out["spec"]["prefill"]["kvCacheLayout"] == "HND"
    assert out["spec"]["decode"]["kvCacheLayout"] == "HND"
    assert out["spec"]["validation"]["policy"] == "Strict"
    # idempotent: a second pass finds nothing to add
    assert review.defaults_patch(out["spec"]) == []


def test_mutation_keeps_explicit_values_and_pool_engine_override():
    o = obj(engine={"type": "vllm", "image": "vllm/vllm-openai:v0.33.0", "version": "0.33.0"},
            kvTransfer={"backends": ["UCX"]}, decode__kvCacheLayout="NHD",
            decode__engine={"image": "vllm/vllm-openai:v0.32.1"})
    ops = review.defaults_patch(o["spec"])
    paths = {op["path"]: op["value"] for op in ops}
    assert "/spec/engine/version" not in paths
    assert paths["/spec/kvTransfer/sideChannelPort"] == 5600
    assert "/spec/decode/kvCacheLayout" not in paths
    assert paths["/spec/decode/engine/version"] == "0.32.1"


@pytest.mark.parametrize("path", examples("rejected"), ids=lambda p: p.stem)
def test_rejected_examples_name_their_rule(path):
    doc = load(path)
    rule = doc["metadata"]["annotations"]["pd-operator.dev/expect-rule"]
    r = _resp(review.review_validate(_review("CREATE", doc))[0])
    assert r["allowed"] is False
    assert rule in r["status"]["message"]


@pytest.mark.parametrize("path", examples("accepted"), ids=lambda p: p.stem)
def test_accepted_examples_admitted_and_mutation_is_stable(path):
    doc = load(path)
    r = _resp(review.review_validate(_review("CREATE", doc))[0])
    assert r["allowed"] is True, r
    mutated = _apply_patch(doc, review.defaults_patch(doc["spec"]))
    assert review.validate(_review("UPDATE", mutated, doc)["request"]).allowed


def test_webhook_configurations_shape():
    v = configs.validating("https://127.0.0.1:9443", b"PEM")
    m = configs.mutating("https://127.0.0.1:9443", b"PEM")
    for cfg, path in ((v, "/validate"), (m, "/mutate")):
        hook = cfg["webhooks"][0]
        assert hook["failurePolicy"] == "Fail"
        assert hook["sideEffects"] == "None"
        assert hook["timeoutSeconds"] <= 5
        assert hook["clientConfig"]["url"] == "https://127.0.0.1:9443" + path
        assert base64.b64decode(hook["clientConfig"]["caBundle"]) == b"PEM"
        assert hook["rules"][0]["operations"] == ["CREATE", "UPDATE"]
        assert hook["rules"][0]["resources"] == ["pddeployments"]


def test_mutating_match_condition_names_every_defaulted_field():
    """The CEL matchCondition must mention every field defaults_patch can add."""
    expr = configs.mutating("https://x", b"P")["webhooks"][0]["matchConditions"][0]["expression"]
    full = copy.deepcopy(BASE)
    full["spec"]["prefill"]["engine"] = {"image": "vllm/vllm-openai:v0.33.0"}
    full["spec"]["decode"]["engine"] = {"image": "vllm/vllm-openai:v0.33.0"}
    for op in review.defaults_patch(full["spec"]):
        field_ = op["path"].replace("/", ".").lstrip(".")
        assert f"object.{field_}" in expr or f"has(object.{field_})" in expr or \
            "engine.version" in field_, field_


def test_https_server_with_generated_ca(tmp_path):
    files = certs.generate(tmp_path)

    async def main():
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        runner = await server.start("127.0.0.1", port, files.cert, files.key)
        try:
            ctx = ssl.create_default_context(cafile=str(files.ca_cert))  # verifies SAN
            async with aiohttp.ClientSession() as session:
                async with session.post(f"https://127.0.0.1:{port}/validate",
                                        json=_review("CREATE", obj(prefill__tensorParallelSize=3)),
                                        ssl=ctx) as resp:
                    assert resp.status == 200
                    body = await resp.json()
                async with session.post(f"https://127.0.0.1:{port}/mutate",
                                        json=_review("CREATE", BASE), ssl=ctx) as resp:
                    mutated = await resp.json()
                async with session.post(f"https://127.0.0.1:{port}/validate", data=b"{nope",
                                        ssl=ctx) as resp:
                    assert resp.status == 400
            return body, mutated
        finally:
            await runner.cleanup()

    body, mutated = asyncio.run(main())
    assert body["response"]["allowed"] is False and "TP-" in body["response"]["status"]["message"]
    assert mutated["response"]["patchType"] == "JSONPatch"
