"""Admitted means the API server accepts the children (issue 11, item 1): the rendered children
of edge specs (the longest name, the most replicas, full templates) and of random admitted
specs pass a server-side dry-run on the real kube-apiserver; the CRD itself refuses a name
its children could not carry (CEL NAME-RENDERABLE), without the webhook."""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from op_cluster import install_crd, load_example

from pd_operator.api import v1alpha1 as api
from pd_operator.render import Owner, render
from pd_operator.validate import SpecError, parse_spec, validate_spec

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "unit" / "operator"))
import test_op_renderable as props  # noqa: E402  (the unit tier's spec strategies)

pytestmark = pytest.mark.cluster

FULL_TEMPLATE = {
    "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "zone": "a"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                    {"key": "maint", "operator": "Equal", "value": "x", "effect": "NoExecute",
                     "tolerationSeconds": 30},
                    {"operator": "Exists"}],
    "resources": {"limits": {"cpu": 8, "memory": "64Gi", "example.com/nic": "1"},
                  "requests": {"cpu": "500m", "memory": "1e9", "example.com/nic": 1,
                               "nvidia.com/gpu": "3"}},
    "env": [{"name": "HF_HOME", "value": "/cache"}, {"name": "a.b-c", "value": ""},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k",
                                                              "optional": True}}}],
}


@pytest.fixture(scope="module")
def crd(kubectl):
    """The CRD, installed once (`kubectl wait` can run before the CRD has a status: retry)."""
    for attempt in range(3):
        try:
            return install_crd(kubectl)
        except AssertionError:
            if attempt == 2:
                raise
            time.sleep(1)


def _doc(name: str, replicas: int, template: dict) -> dict:
    doc = copy.deepcopy(load_example("accepted", "llama-3.1-8b-basic"))
    doc["metadata"] = {"name": name}
    for role in ("prefill", "decode"):
        doc["spec"][role]["replicas"] = replicas
        doc["spec"][role]["template"] = copy.deepcopy(template)
    doc["spec"]["router"] = {"replicas": replicas}
    return doc


def _dry_run(kubectl, namespace: str, objs: list[dict]) -> None:
    items = []
    for o in objs:
        o = copy.deepcopy(o)
        o["metadata"]["namespace"] = namespace
        items.append(o)
    out = kubectl("create", "--dry-run=server", "-o", "name", "-f", "-", check=False,
                  input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.split()) == len(items)


def _children(doc: dict) -> list[dict]:
    return render(Owner(doc["metadata"]["name"], "ns", "0f6b5c1e-2b1f-4c55-9a49-5d8e6f7a8b9c"),
                  validate_spec(parse_spec(doc["spec"]))).children


@pytest.mark.parametrize("name, replicas, template", [
    ("x" * api.MAX_NAME_LENGTH, api.MAX_REPLICAS, FULL_TEMPLATE),
    ("a", 0, {}),
    ("a-" * 21 + "z", 1, FULL_TEMPLATE),
])
def test_edge_specs_are_accepted_by_the_api_server(crd, kubectl, namespace, name, replicas,
                                                   template):
    doc = _doc(name, replicas, template)
    _dry_run(kubectl, namespace, [doc])  # the CRD schema and its CEL rules
    _dry_run(kubectl, namespace, _children(doc))


def test_crd_refuses_names_its_children_cannot_carry(crd, kubectl, namespace):
    for name in ("x" * (api.MAX_NAME_LENGTH + 1), "1abc"):
        doc = _doc(name, 1, {})
        doc["metadata"]["namespace"] = namespace
        out = kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(doc),
                      check=False)
        assert out.returncode != 0 and "NAME-RENDERABLE" in out.stderr, out.stderr


def test_random_admitted_specs_render_children_the_api_server_accepts(crd, kubectl,
                                                                      namespace):
    checked = []

    @settings(max_examples=40, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(props.templates, props.templates, props.replicas)
    def one(tp, td, reps):
        doc = _doc("prop", 1, {})
        doc["spec"]["prefill"]["template"], doc["spec"]["decode"]["template"] = tp, td
        doc["spec"]["prefill"]["replicas"] = reps
        try:
            parse_spec(doc["spec"])
        except SpecError:
            return
        _dry_run(kubectl, namespace, [doc] + _children(doc))
        checked.append(doc)

    one()
    assert checked  # some generated specs were admitted and checked
