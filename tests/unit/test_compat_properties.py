"""Property tests: every spec the models accept yields a verdict list and never raises; bad
input gives exit 2 with a clear message, never a traceback."""

import json
import subprocess

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pd_operator.api import v1alpha1 as api
from pd_operator.cli.main import main as pdctl
from pd_operator.validate import SpecError, validate_object
from tests.helpers import pdctl as pdctl_executable

FAMILIES = list(api.Family.__args__)
KV_DTYPES = list(api.KVCacheDtype.__args__)
VERSIONS = ["0.11.0", "0.13.0", "0.14.0", "0.16.0", "0.18.0", "0.20.0", "0.24.0", "0.26.0",
            "0.28.0", "0.30.0", "0.32.0", "0.33.0", "0.40.0", "0.33.1.dev3+gabc"]


def pools():
    return st.fixed_dictionaries({
        "tensorParallelSize": st.sampled_from([1, 2, 3, 4, 8, 16]),
        "pipelineParallelSize": st.sampled_from([1, 2]),
        "dataParallelSize": st.sampled_from([1, 2, 4]),
        "decodeContextParallelSize": st.sampled_from([1, 2, 4]),
        "blockSize": st.sampled_from([1, 8, 16, 24, 32, 64, 128]),
        "attentionBackend": st.sampled_from(["auto", "FLASH_ATTN", "FLASHINFER", "TRITON_ATTN"]),
        "kvCacheDtype": st.sampled_from(KV_DTYPES),
        "kvCacheLayout": st.sampled_from(["HND", "NHD"]),
        "kvCacheScales": st.sampled_from(["static", "dynamic", "packed"]),
        "hybridKVCacheManager": st.booleans(),
        "prefixCaching": st.booleans(),
    }, optional={
        "speculative": st.fixed_dictionaries({
            "method": st.sampled_from(["eagle3", "mtp", "ngram", "draft_model"]),
            "model": st.sampled_from(["org/draft", "org/other"]),
            "numSpeculativeTokens": st.integers(1, 5)}),
        "args": st.lists(st.sampled_from(["--enable-sleep-mode", "--max-num-seqs=8",
                                          "--calculate-kv-scales", "--model=x"]), max_size=2),
        "engine": st.fixed_dictionaries({"image": st.sampled_from(
            [f"vllm/vllm-openai:v{v}" for v in VERSIONS]
            + ["vllm/vllm-openai@sha256:" + "b" * 64])}),
        "template": st.fixed_dictionaries({"env": st.lists(st.fixed_dictionaries({
            "name": st.sampled_from(["PYTORCH_CUDA_ALLOC_CONF", "VLLM_SSM_CONV_STATE_LAYOUT",
                                     "VLLM_NIXL_SIDE_CHANNEL_HOST"]),
            "value": st.sampled_from(["expandable_segments:True", "SD", "DS", "0.0.0.0"])}),
            max_size=2)}),
    })


specs = st.fixed_dictionaries({
    "apiVersion": st.just("serving.pd-operator.dev/v1alpha1"),
    "kind": st.just("PDDeployment"),
    "metadata": st.just({"name": "prop"}),
    "spec": st.fixed_dictionaries({
        "model": st.fixed_dictionaries({
            "name": st.sampled_from(["m/a", "m/b"]),
            "family": st.sampled_from(FAMILIES),
            "numKVHeads": st.integers(1, 64),
            "headSize": st.sampled_from([64, 128, 576]),
            "numHiddenLayers": st.integers(1, 128),
            "slidingWindow": st.sampled_from([0, 4096]),
        }),
        "engine": st.fixed_dictionaries({
            "type": st.sampled_from(["vllm", "builtin"]),
            "image": st.sampled_from([f"vllm/vllm-openai:v{v}" for v in VERSIONS]
                                     + ["repo/img@sha256:" + "c" * 64, "repo/img:latest"]),
        }),
        "kvTransfer": st.fixed_dictionaries({
            "connector": st.sampled_from(["NixlConnector", "NixlPushConnector"]),
            "bufferDevice": st.sampled_from(["cuda", "cpu"]),
            "enablePermuteLocalKV": st.booleans(),
            "enableCrossLayersBlocks": st.booleans(),
            "sideChannelPort": st.sampled_from([5600, 7999, 65535]),
        }),
        "validation": st.fixed_dictionaries({"policy": st.sampled_from(["Strict", "Warn",
                                                                        "Disabled"])}),
        "prefill": pools(),
        "decode": pools(),
    }),
})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs)
def test_every_accepted_spec_gets_a_decision(obj):
    result = validate_object(obj).to_dict()
    json.dumps(result)  # serialisable
    assert isinstance(result["verdicts"], list)
    assert result["accepted"] == all(v["severity"] != "reject" for v in result["verdicts"])
    for v in result["verdicts"]:
        assert v["rule"] and v["fields"] and v["message"] and v["fix"] and v["source"]
        assert all(f.startswith("spec.") for f in v["fields"])
    if obj["spec"]["validation"]["policy"] != "Strict":
        assert result["accepted"]


junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=3),
    max_leaves=10,
)


@settings(max_examples=200, deadline=None)
@given(junk)
def test_arbitrary_documents_raise_only_spec_errors(doc):
    try:
        validate_object(doc)
    except SpecError as exc:
        assert exc.problems and all(path and msg for path, msg in exc.problems)


@settings(max_examples=100, deadline=None)
@given(specs, st.sampled_from(["numKVHeads", "family", "headSize"]),
       st.sampled_from(["eight", -3, None, [1], {"a": 1}]))
def test_wrong_types_give_field_paths(obj, field, value):
    obj["spec"]["model"][field] = value
    try:
        validate_object(obj)
    except SpecError as exc:
        assert any(path == f"spec.model.{field}" for path, _ in exc.problems)
    else:
        raise AssertionError("a wrong type was accepted")


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200))
def test_pdctl_check_never_tracebacks(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("docs") / "in.yaml"
    path.write_text(text, encoding="utf-8")
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = pdctl(["check", "-o", "json", str(path)])
    assert code in (0, 1, 2)
    if code == 2 and out.getvalue():
        assert all(doc["accepted"] is False for doc in json.loads(out.getvalue()))


def run_cli(*args, stdin=None):
    return subprocess.run([pdctl_executable(), *args], input=stdin,
                          capture_output=True, text=True, timeout=60)


def test_cli_malformed_yaml_exit_2_without_traceback():
    proc = run_cli("check", "-", stdin="spec: [unclosed\n")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "line" in proc.stdout


def test_cli_schema_error_names_field():
    doc = {"apiVersion": "serving.pd-operator.dev/v1alpha1", "kind": "PDDeployment",
           "metadata": {"name": "x"},
           "spec": {"model": {"name": "m", "family": "dense", "numKVHeads": "eight",
                              "headSize": 128, "numHiddenLayers": 2},
                    "engine": {"image": "vllm/vllm-openai:v0.33.0"}, "prefill": {}, "decode": {},
                    "bogus": 1}}
    proc = run_cli("check", "-o", "json", "-", stdin=yaml.safe_dump(doc))
    assert proc.returncode == 2
    (report,) = json.loads(proc.stdout)
    paths = {e["path"] for e in report["errors"]}
    assert {"spec.model.numKVHeads", "spec.bogus"} <= paths


def test_cli_missing_file_exit_2():
    proc = run_cli("check", "/nonexistent/pdd.yaml")
    assert proc.returncode == 2 and "No such file" in proc.stdout


def test_cli_multi_document_and_stdin():
    good = {"apiVersion": "serving.pd-operator.dev/v1alpha1", "kind": "PDDeployment",
            "metadata": {"name": "good"},
            "spec": {"model": {"name": "m", "family": "dense", "numKVHeads": 8, "headSize": 128,
                               "numHiddenLayers": 2},
                     "engine": {"image": "vllm/vllm-openai:v0.33.0"},
                     "prefill": {"attentionBackend": "FLASH_ATTN"},
                     "decode": {"attentionBackend": "FLASH_ATTN"}}}
    bad = yaml.safe_load(yaml.safe_dump(good))
    bad["metadata"]["name"] = "bad"
    bad["spec"]["decode"]["tensorParallelSize"] = 3
    bad["spec"]["prefill"]["tensorParallelSize"] = 2
    proc = run_cli("check", "-o", "json", "-", stdin=yaml.safe_dump_all([good, bad]))
    assert proc.returncode == 1
    reports = json.loads(proc.stdout)
    assert [r["name"] for r in reports] == ["good", "bad"]
    assert reports[0]["accepted"] and not reports[1]["accepted"]
    assert "TP-DIVISIBLE" in {v["rule"] for v in reports[1]["verdicts"]}
    assert set(reports[0]) >= {"name", "accepted", "verdicts", "prefillHash", "decodeHash"}
    only_good = run_cli("check", "-", stdin=yaml.safe_dump(good))
    assert only_good.returncode == 0


def test_cli_crd_explain_and_yaml_output():
    crd = yaml.safe_load(run_cli("crd").stdout)
    assert crd["kind"] == "CustomResourceDefinition"
    explained = json.loads(run_cli("explain", "hybrid-ssm", "--engine-version", "0.18",
                                   "-o", "json").stdout)
    hetero = next(c for c in explained["capabilities"] if c["capability"] == "Hetero TP")
    assert hetero["status"] == "🚧" and hetero["rules"][0]["rule"] == "SSM-HETERO-TP"
    assert run_cli("explain", "nonsense").returncode == 2
