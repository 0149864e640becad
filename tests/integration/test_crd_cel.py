"""A CRD's CEL validation rule is enforced by the real apiserver, and kubectl shows the denial."""

from __future__ import annotations

import json
import secrets
import time

import pytest
import yaml

pytestmark = pytest.mark.cluster


def _crd(group: str) -> dict:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"pools.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "pools", "singular": "pool", "kind": "Pool"},
            "versions": [{
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {"spec": {
                        "type": "object",
                        "required": ["minReplicas", "maxReplicas"],
                        "properties": {
                            "minReplicas": {"type": "integer"},
                            "maxReplicas": {"type": "integer"},
                        },
                        "x-kubernetes-validations": [{
                            "rule": "self.minReplicas <= self.maxReplicas",
                            "message": "minReplicas must not exceed maxReplicas",
                            "fieldPath": ".minReplicas",
                        }],
                    }},
                }},
            }],
        },
    }


def _pool(group: str, name: str, lo: int, hi: int) -> str:
    return yaml.safe_dump({
        "apiVersion": f"{group}/v1", "kind": "Pool", "metadata": {"name": name},
        "spec": {"minReplicas": lo, "maxReplicas": hi},
    })


@pytest.fixture
def crd_group(kubectl):
    group = f"cel{secrets.token_hex(3)}.test.pd-operator.dev"
    kubectl("apply", "-f", "-", input=json.dumps(_crd(group)))
    kubectl("wait", "--for=condition=Established", f"crd/pools.{group}", "--timeout=60s")
    yield group
    kubectl("delete", f"crd/pools.{group}", "--wait=false", check=False)


def test_cel_rule_rejects_bad_object_through_kubectl(kubectl, namespace, crd_group):
    # the CRD's REST mapping can lag its Established condition by a moment in discovery
    deadline = time.monotonic() + 30
    while True:
        good = kubectl("apply", "-n", namespace, "-f", "-",
                       input=_pool(crd_group, "good", 1, 3), check=False)
        if good.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert good.returncode == 0, good.stderr

    bad = kubectl("apply", "-n", namespace, "-f", "-",
                  input=_pool(crd_group, "bad", 5, 2), check=False)
    assert bad.returncode != 0
    assert "minReplicas must not exceed maxReplicas" in bad.stderr
    assert "spec.minReplicas" in bad.stderr  # fieldPath reported
    assert "Invalid" in bad.stderr

    listed = kubectl("get", "pools", "-n", namespace, "-o", "name").stdout.split()
    assert listed == [f"pool.{crd_group}/good"]

    # an update that breaks the rule is rejected too (rule runs on UPDATE)
    upd = kubectl("patch", "pool", "good", "-n", namespace, "--type=merge",
                  "-p", '{"spec":{"minReplicas":9}}', check=False)
    assert upd.returncode != 0 and "minReplicas must not exceed maxReplicas" in upd.stderr
