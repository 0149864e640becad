"""The example deployments under deploy/examples are judged as they claim.

accepted/: every file is admitted (warnings allowed, no reject verdict).
rejected/: every file is rejected, and the rule named by its `pd-operator.dev/expect-rule`
annotation is among the reject verdicts.
Both are checked in-process (validate_object) and through the real `pdctl check` console script.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import pytest
import yaml

from pd_operator.validate import validate_object
from pd_runtime.compat import rules_common, rules_known_bugs, rules_vllm
from tests.helpers import pdctl

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "deploy" / "examples"
ACCEPTED = sorted((EXAMPLES / "accepted").glob("*.yaml"))
REJECTED = sorted((EXAMPLES / "rejected").glob("*.yaml"))
EXPECT = "pd-operator.dev/expect-rule"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
KNOWN_RULES = {r.id for r in rules_common.RULES + rules_vllm.RULES + rules_known_bugs.RULES}

FAMILIES_ACCEPTED = {"dense", "moe", "mla", "sparse-mla", "hybrid-ssm", "multimodal"}
VERSIONS_ACCEPTED = {"0.14", "0.20", "0.28", "0.32", "0.33"}
RULES_REJECTED = {
    "TP-PREFILL-GT-DECODE", "TP-EXCEEDS-KV-HEADS", "HETERO-TP-LAYOUT", "BLOCK-DIVISIBLE",
    "ENGINE-VERSION-MATCH", "KV-DTYPE-MATCH", "MODEL-NAME-MATCH", "ENCDEC-UNSUPPORTED",
    "TP-DIVISIBLE", "DECODE-PP", "PREFILL-PP-PULL", "HMA-MATCH", "SPEC-MATCH",
    "ATTN-BACKEND-MATCH", "LAYOUT-MATCH", "BLOCK-HMA", "SSM-HETERO-TP", "KV-SCALES-DYNAMIC",
    "CONNECTOR-MATCH", "EXPANDABLE-SEGMENTS", "BLOCK-HOST-BUFFER", "DCP-NON-MLA",
    "ARGS-MANAGED",
    # known vLLM bugs (rules_known_bugs) and the version check
    "BUG-TRITON-HND-HETERO-TP", "BUG-GQA-REPLICATED-HETERO-TP", "BUG-MAMBA-EXTERNAL-KV",
    "BUG-SSM-ONE-LOCAL-BLOCK", "ENGINE-VERSION-IMAGE-CONFLICT", "CPU-ATTN-BLOCK-SIZE",
}
PDCTL = [pdctl()]


@cache
def load(path: Path) -> dict:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path.name}: one PDDeployment per file"
    return docs[0]


def reject_rules(result) -> list[str]:
    return [v["rule"] for v in result.to_dict()["verdicts"] if v["severity"] == "reject"]


def rel(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


# ------------------------------------------------------------------------- shape of the files
def test_enough_examples():
    assert len(ACCEPTED) >= 12
    assert len(REJECTED) >= 18


@pytest.mark.parametrize("path", ACCEPTED + REJECTED, ids=rel)
def test_example_shape(path: Path):
    text = path.read_text()
    assert text.startswith("#"), f"{rel(path)} must open with a comment saying what it shows"
    obj = load(path)
    assert obj["apiVersion"] == "serving.pd-operator.dev/v1alpha1"
    assert obj["kind"] == "PDDeployment"
    assert DNS_LABEL.match(obj["metadata"]["name"]), obj["metadata"]["name"]


def test_names_unique():
    names = [load(p)["metadata"]["name"] for p in ACCEPTED + REJECTED]
    dupes = {n for n in names if names.count(n) > 1}
    assert not dupes


# ------------------------------------------------------------------------- accepted
@pytest.mark.parametrize("path", ACCEPTED, ids=rel)
def test_accepted_example(path: Path):
    obj = load(path)
    assert EXPECT not in (obj["metadata"].get("annotations") or {})
    result = validate_object(obj)
    assert result.accepted, (rel(path), result.to_dict()["verdicts"])
    assert reject_rules(result) == []


def test_accepted_coverage():
    objs = [load(p) for p in ACCEPTED]
    specs = [o["spec"] for o in objs]
    assert FAMILIES_ACCEPTED <= {s["model"]["family"] for s in specs}

    versions = set()
    for p in ACCEPTED:
        result = validate_object(load(p)).to_dict()
        if result["rules"].startswith("vllm "):
            versions.add(result["rules"].split()[1])
    assert VERSIONS_ACCEPTED <= versions

    def pools(pred):
        return any(pred(s["prefill"], s["decode"], s) for s in specs)

    tp = lambda x: x.get("tensorParallelSize", 1)  # noqa: E731
    dense_like = ("dense", "moe", "multimodal")
    assert pools(lambda p, d, s: s["model"]["family"] in dense_like and tp(p) < tp(d))
    assert pools(lambda p, d, s: s["model"]["family"] in dense_like
                 and tp(d) < tp(p) <= s["model"]["numKVHeads"])
    assert pools(lambda p, d, s: s["model"]["family"] == "mla" and tp(p) < tp(d))
    assert pools(lambda p, d, s: s["model"]["family"] == "mla" and tp(p) > tp(d))
    assert pools(lambda p, d, s: d.get("blockSize", 16) != p.get("blockSize", 16)
                 and d.get("blockSize", 16) % p.get("blockSize", 16) == 0)
    assert pools(lambda p, d, s: p.get("kvCacheLayout") == "HND" == d.get("kvCacheLayout"))
    assert pools(lambda p, d, s: p.get("kvCacheLayout") == "HND" and d.get("kvCacheLayout")
                 == "NHD" and d.get("kvTransfer", {}).get("enablePermuteLocalKV"))
    assert pools(lambda p, d, s: p.get("kvCacheDtype") == "fp8" == d.get("kvCacheDtype"))
    assert pools(lambda p, d, s: p.get("speculative") and p.get("speculative")
                 == d.get("speculative") and p["speculative"]["method"] == "eagle3")
    assert pools(lambda p, d, s: max(p.get("dataParallelSize", 1),
                                     d.get("dataParallelSize", 1)) > 1)
    assert pools(lambda p, d, s: s.get("kvTransfer", {}).get("connector") == "NixlPushConnector")
    assert pools(lambda p, d, s: s["engine"]["type"] == "builtin")
    assert pools(lambda p, d, s: s["model"].get("slidingWindow", 0) > 0)


def test_encoder_decoder_is_never_accepted():
    for path in ACCEPTED:
        assert load(path)["spec"]["model"]["family"] != "encoder-decoder"


# ------------------------------------------------------------------------- rejected
@pytest.mark.parametrize("path", REJECTED, ids=rel)
def test_rejected_example(path: Path):
    obj = load(path)
    expected = (obj["metadata"].get("annotations") or {}).get(EXPECT)
    assert expected, f"{rel(path)} needs the {EXPECT} annotation"
    assert expected in KNOWN_RULES, f"{rel(path)}: unknown rule id {expected}"
    result = validate_object(obj)
    assert not result.accepted
    assert expected in reject_rules(result), (rel(path), result.to_dict()["verdicts"])


def test_rejected_coverage():
    expected = {load(p)["metadata"]["annotations"][EXPECT] for p in REJECTED}
    assert RULES_REJECTED <= expected, sorted(RULES_REJECTED - expected)


def test_version_twins():
    """vllm-project/vllm#43523: P TP 4 -> D TP 1 is rejected on 0.13 and accepted on 0.14."""
    old = load(EXAMPLES / "rejected" / "tp4-to-tp1-v0.13.yaml")
    new = load(EXAMPLES / "accepted" / "llama-3.1-8b-tp4-to-tp1-v0.14.yaml")
    for obj in (old, new):
        assert (obj["spec"]["prefill"]["tensorParallelSize"],
                obj["spec"]["decode"]["tensorParallelSize"]) == (4, 1)
        assert obj["spec"]["model"]["family"] == "dense"
    assert not validate_object(old).accepted
    assert validate_object(new).accepted


# ------------------------------------------------------------------------- pdctl check
def _pdctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*PDCTL, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def test_pdctl_check_accepts_all_accepted_examples():
    proc = _pdctl("check", "-o", "json", *map(str, ACCEPTED))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    reports = json.loads(proc.stdout)
    assert len(reports) == len(ACCEPTED)
    assert {r["name"] for r in reports} == {load(p)["metadata"]["name"] for p in ACCEPTED}
    for report in reports:
        assert report["accepted"] is True
        assert all(v["severity"] != "reject" for v in report["verdicts"])


@pytest.fixture(scope="module")
def pdctl_rejected() -> dict[Path, tuple[int, str, str]]:
    """`pdctl check -o json FILE` for every rejected file (a few at a time)."""
    def run(path: Path) -> tuple[int, str, str]:
        proc = _pdctl("check", "-o", "json", str(path))
        return proc.returncode, proc.stdout, proc.stderr

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return dict(zip(REJECTED, pool.map(run, REJECTED), strict=True))


@pytest.mark.parametrize("path", REJECTED, ids=rel)
def test_pdctl_check_rejects(path: Path, pdctl_rejected):
    code, out, err = pdctl_rejected[path]
    assert code == 1, out + err
    reports = json.loads(out)
    assert len(reports) == 1
    report = reports[0]
    assert report["accepted"] is False
    assert report["name"] == load(path)["metadata"]["name"]
    expected = load(path)["metadata"]["annotations"][EXPECT]
    assert expected in [v["rule"] for v in report["verdicts"] if v["severity"] == "reject"]
    for verdict in report["verdicts"]:
        assert {"rule", "severity", "fields", "message", "fix"} <= set(verdict)
