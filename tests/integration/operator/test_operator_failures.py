"""A child the real API server refuses is visible on the PDDeployment (issue 11, item 2): a
ResourceQuota of zero StatefulSets makes kube-apiserver answer 403 "exceeded quota" to the
operator's apply, which the webhook cannot foresee. The status says Degraded naming the child
and quoting the API server, an Event says the same, and lifting the quota recovers."""

from __future__ import annotations

import copy
import json

import pytest

from op_cluster import (condition, get_json, install_crd, load_example, pdd, running_operator,
                        wait_for)

pytestmark = pytest.mark.cluster


@pytest.fixture
def operator(kubeconfig, kubectl, namespace, tmp_path):
    install_crd(kubectl)
    with running_operator(kubeconfig, kubectl, namespace, tmp_path) as op:
        yield op


def _small(ns: str) -> dict:
    doc = copy.deepcopy(load_example("accepted", "llama-3.1-8b-basic"))
    doc["metadata"] = {"name": "quota", "namespace": ns}
    for role in ("prefill", "decode"):
        doc["spec"][role]["replicas"] = 1
        doc["spec"][role]["template"].pop("nodeSelector", None)
    return doc


def test_refused_child_is_degraded_with_event_then_recovers(operator, kubectl, namespace):
    quota = {"apiVersion": "v1", "kind": "ResourceQuota",
             "metadata": {"name": "no-statefulsets", "namespace": namespace},
             "spec": {"hard": {"count/statefulsets.apps": "0"}}}
    kubectl("apply", "-f", "-", input=json.dumps(quota))
    wait_for("the quota to be counted", lambda: get_json(
        kubectl, "resourcequota", "no-statefulsets", "-n", namespace).get("status", {})
        .get("hard"), timeout=30)
    kubectl("apply", "-f", "-", input=json.dumps(_small(namespace)))

    def degraded():
        obj = pdd(kubectl, namespace, "quota")
        c = condition(obj, "Degraded")
        return obj if c and c["status"] == "True" else None
    obj = wait_for("Degraded=True", degraded, timeout=60, every=1)
    c = condition(obj, "Degraded")
    assert obj["status"]["phase"] == "Degraded"
    assert c["reason"] == "ApplyFailed"
    assert "StatefulSet quota-" in c["message"] and "exceeded quota" in c["message"]

    def event():
        items = get_json(kubectl, "events", "-n", namespace,
                         "--field-selector", "involvedObject.name=quota,reason=ApplyFailed")
        return items["items"] or None
    ev = wait_for("a Warning Event ApplyFailed", event, timeout=30, every=1)[0]
    assert ev["type"] == "Warning" and "exceeded quota" in ev["message"]
    assert ev["involvedObject"]["kind"] == "PDDeployment"
    assert "quota" in operator.output()  # the log names the object (namespace/name)
    assert f"{namespace}/quota" in operator.output()

    kubectl("delete", "resourcequota", "no-statefulsets", "-n", namespace)

    def recovered():
        c = condition(pdd(kubectl, namespace, "quota"), "Degraded")
        return c if c and c["status"] == "False" else None
    # the retries back off (5, 10, 20, 40 s ...): recovery within the next few attempts
    wait_for("Degraded=False after the quota is gone", recovered, timeout=150, every=2)
    sts = get_json(kubectl, "statefulsets", "-n", namespace)["items"]
    assert sorted(s["metadata"]["name"] for s in sts) == ["quota-decode", "quota-prefill"]
