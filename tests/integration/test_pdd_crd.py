"""The generated PDDeployment CRD on the real API server: it installs, `kubectl explain` shows
the field descriptions, the API server applies defaults and enforces the CEL rules (with the
rule id in the message), and `kubectl get pdd` prints the printer columns."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).parents[2]
CRD = ROOT / "crds" / "pddeployment.yaml"
EXAMPLE = ROOT / "deploy" / "examples" / "accepted" / "llama-3.1-8b-basic.yaml"


@pytest.fixture(scope="module")
def crd_installed(kubectl):
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    kubectl("wait", "--for=condition=Established",
            "crd/pddeployments.serving.pd-operator.dev", "--timeout=60s")


def _doc(namespace: str, **pool_changes) -> dict:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["metadata"] = {"name": "crd-test", "namespace": namespace}
    for role in ("prefill", "decode"):
        doc["spec"][role].update(copy.deepcopy(pool_changes))
    return doc


def _explain(kubectl, field: str) -> str:
    """`kubectl explain`, waiting for the API server to publish the new CRD's OpenAPI schema
    (it lags the Established condition by a few seconds)."""
    deadline = time.monotonic() + 60
    while True:
        out = kubectl("explain", field, check=False)
        if out.returncode == 0 or time.monotonic() > deadline:
            assert out.returncode == 0, out.stderr
            return out.stdout
        time.sleep(1)


def test_explain_shows_descriptions(crd_installed, kubectl):
    out = _explain(kubectl, "pdd.spec.model.numKVHeads")
    assert "Total KV heads" in out
    out = _explain(kubectl, "pddeployment.spec.prefill")
    assert "tensorParallelSize" in out and "kvCacheLayout" in out


def test_server_applies_defaults(crd_installed, kubectl, namespace):
    doc = _doc(namespace)
    for role in ("prefill", "decode"):
        doc["spec"][role].pop("blockSize", None)
    out = kubectl("create", "--dry-run=server", "-o", "json", "-f", "-",
                  input=yaml.safe_dump(doc)).stdout
    stored = json.loads(out)["spec"]
    assert stored["prefill"]["blockSize"] == 16
    assert stored["kvTransfer"]["sideChannelPort"] == 5600


def test_cel_rule_rejects_with_rule_id(crd_installed, kubectl, namespace):
    doc = _doc(namespace, kvCacheScales="dynamic", kvCacheDtype="auto")
    out = kubectl("create", "--dry-run=server", "-f", "-", input=yaml.safe_dump(doc),
                  check=False)
    assert out.returncode != 0
    assert "KV-SCALES-UNQUANTIZED" in out.stderr
    assert "spec.prefill.kvCacheScales" in out.stderr


def test_schema_rejects_wrong_enum(crd_installed, kubectl, namespace):
    doc = _doc(namespace, kvCacheLayout="XYZ")
    out = kubectl("create", "--dry-run=server", "-f", "-", input=yaml.safe_dump(doc),
                  check=False)
    assert out.returncode != 0 and "kvCacheLayout" in out.stderr


def test_printer_columns_and_status_subresource(crd_installed, kubectl, namespace):
    kubectl("create", "-f", "-", input=yaml.safe_dump(_doc(namespace)))
    status = {"status": {"phase": "Ready", "prefill": {"replicas": 2, "readyReplicas": 2},
                         "decode": {"replicas": 4, "readyReplicas": 3}}}
    kubectl("patch", "pdd", "crd-test", "-n", namespace, "--subresource=status",
            "--type=merge", "-p", json.dumps(status))
    header, row = kubectl("get", "pdd", "-n", namespace).stdout.splitlines()[:2]
    assert header.split() == ["NAME", "PHASE", "P-READY", "D-READY", "AGE"]
    assert row.split()[:4] == ["crd-test", "Ready", "2", "3"]
    # the main resource ignores status writes; only the subresource takes them
    kubectl("patch", "pdd", "crd-test", "-n", namespace, "--type=merge",
            "-p", json.dumps({"status": {"phase": "Degraded"}}))
    phase = kubectl("get", "pdd", "crd-test", "-n", namespace,
                    "-o", "jsonpath={.status.phase}").stdout
    assert phase == "Ready"
