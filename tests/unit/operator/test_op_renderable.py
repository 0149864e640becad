"""Admitted means renderable (issue 11, item 1): every spec the models accept, under a name the
webhook accepts, renders children without an exception and within the limits the API server
holds the children to; bad templates are refused with field paths, never a crash."""

from __future__ import annotations

import copy
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from op_fixtures import BASE

from pd_operator.api import k8s
from pd_operator.api import v1alpha1 as api
from pd_operator.render import Owner, render
from pd_operator.validate import SpecError, parse_spec, validate_spec
from pd_operator.webhook import review

LABEL_VALUE = re.compile(k8s.LABEL_VALUE)

names = st.sampled_from(["a", "demo", "x" * api.MAX_NAME_LENGTH, "a-" * 21 + "b",
                         "x" * (api.MAX_NAME_LENGTH + 1), "1abc", "a.b", "Abc", "a-"])
scalars = st.none() | st.booleans() | st.integers(-5, 2**40) | st.sampled_from(
    ["", "1", "500m", "16Gi", "abc", "-1", "1e3", "0.5", "a/b", "bad key", "x" * 70])
envs = st.lists(st.fixed_dictionaries(
    {"name": st.sampled_from(["A", "B_1", "1X", "a.b", "", "bad=name"])},
    optional={"value": scalars, "valueFrom": st.sampled_from(
        [{"fieldRef": {"fieldPath": "status.podIP"}}, {"secretKeyRef": {"name": "s", "key": "k"}},
         {}, {"fieldRef": {}}, "x"])}), max_size=4)
tolerations = st.lists(st.fixed_dictionaries({}, optional={
    "key": st.sampled_from(["", "gpu", "nvidia.com/gpu", "bad key"]),
    "operator": st.sampled_from(["Exists", "Equal", "Maybe"]),
    "value": scalars, "effect": st.sampled_from(["NoSchedule", "NoExecute", "Never"]),
    "tolerationSeconds": st.integers(-10, 10)}), max_size=3)
quantity_maps = st.dictionaries(st.sampled_from(["cpu", "memory", "nvidia.com/gpu", "gpu",
                                                 "example.com/dev", "hugepages-2Mi"]),
                                scalars, max_size=3)
resources = st.fixed_dictionaries({}, optional={"limits": quantity_maps | scalars,
                                                "requests": quantity_maps})
templates = st.fixed_dictionaries({}, optional={
    "env": envs, "tolerations": tolerations, "resources": resources | scalars,
    "nodeSelector": st.dictionaries(st.sampled_from(["zone", "nvidia.com/gpu.product", "a b"]),
                                    scalars, max_size=2)})
replicas = st.sampled_from([0, 1, 7, api.MAX_REPLICAS, api.MAX_REPLICAS + 1, 10**12, -1])


def _spec(template_p, template_d, rep_p, rep_d):
    spec = copy.deepcopy(BASE["spec"])
    spec["prefill"] = {**spec["prefill"], "template": template_p, "replicas": rep_p}
    spec["decode"] = {**spec["decode"], "template": template_d, "replicas": rep_d}
    return spec


def _check_children(children):
    for c in children:
        name = c["metadata"]["name"]
        assert len(name) <= 63 and re.match(api.NAME_PATTERN, name), name
        assert all(LABEL_VALUE.match(v) and len(v) <= 63
                   for v in c["metadata"].get("labels", {}).values())
        if c["kind"] == "StatefulSet":
            assert len(name) <= api.MAX_STATEFULSET_NAME
            assert 0 <= c["spec"]["replicas"] <= api.MAX_REPLICAS
            res = c["spec"]["template"]["spec"]["containers"][0]["resources"]
            for amounts in res.values():
                assert all(re.match(k8s.QUANTITY, str(v)) for v in amounts.values())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(names, templates, templates, replicas, replicas)
def test_every_admitted_spec_renders(name, tp, td, rp, rd):
    try:
        spec = parse_spec(_spec(tp, td, rp, rd))
    except SpecError as exc:  # refused with field paths, never another exception
        assert exc.problems and all(p.startswith("spec.") and m for p, m in exc.problems)
        return
    if api.name_error(name) is not None:
        return  # the webhook (and the CRD's CEL rule) refuse the name
    rendered = render(Owner(name, "ns", "uid"), validate_spec(spec))
    _check_children(rendered.children)


@pytest.mark.parametrize("template, path, words", [
    ({"resources": {"limits": "abc"}}, "spec.prefill.template.resources", "dictionary"),
    ({"resources": {"limits": {"cpu": "abc"}}}, "spec.prefill.template.resources",
     "limits.cpu: 'abc' is not a quantity"),
    ({"resources": {"limits": {"cpu": "1"}, "requests": {"cpu": "2"}}},
     "spec.prefill.template.resources", "less than or equal"),
    ({"resources": {"limits": {"gpu": "1"}}}, "spec.prefill.template.resources",
     "fully qualified"),
    ({"env": [{"value": "x"}]}, "spec.prefill.template.env", "[0].name"),
    ({"env": [{"name": "A", "value": "x", "valueFrom": {"fieldRef": {"fieldPath": "a"}}}]},
     "spec.prefill.template.env", "mutually exclusive"),
    ({"tolerations": [{"operator": "Exists", "value": "x"}]},
     "spec.prefill.template.tolerations", "[0]"),
    ({"tolerations": [{"key": "k", "tolerationSeconds": 5}]},
     "spec.prefill.template.tolerations", "NoExecute"),
    ({"nodeSelector": {"a b": "v"}}, "spec.prefill.template.nodeSelector", "qualified name"),
    ({"env": [{"name": f"V{i}", "value": "x"} for i in range(k8s.MAX_ENV + 1)]},
     "spec.prefill.template.env", "at most"),
])
def test_malformed_templates_are_refused_with_paths(template, path, words):
    with pytest.raises(SpecError) as err:
        parse_spec(_spec(template, {}, 1, 1))
    assert any(p == path and words in m for p, m in err.value.problems), err.value.problems


def test_many_bad_items_make_one_short_message():
    env = [{"value": i} for i in range(k8s.MAX_ENV)]
    with pytest.raises(SpecError) as err:
        parse_spec(_spec({"env": env}, {}, 1, 1))
    (msg,) = [m for p, m in err.value.problems if p.endswith(".env")]
    assert len(msg) < 1000 and "more" in msg


@pytest.mark.parametrize("replicas", [api.MAX_REPLICAS + 1, 10**12])
def test_replicas_are_bounded(replicas):
    with pytest.raises(SpecError):
        parse_spec(_spec({}, {}, replicas, 1))


def test_webhook_refuses_unrenderable_names():
    obj = {"apiVersion": api.GROUP + "/" + api.VERSION, "kind": api.KIND,
           "metadata": {"name": "x" * (api.MAX_NAME_LENGTH + 1)}, "spec": BASE["spec"]}
    out = review.validate({"operation": "CREATE", "object": obj})
    assert not out.allowed and f"at most {api.MAX_NAME_LENGTH}" in out.message
    obj["metadata"]["name"] = "x" * api.MAX_NAME_LENGTH
    assert review.validate({"operation": "CREATE", "object": obj}).allowed
    obj["metadata"]["name"] = "a.b"
    assert "DNS-1035" in review.validate({"operation": "CREATE", "object": obj}).message


def test_templates_keep_their_kubernetes_json_form():
    spec = parse_spec(_spec({"resources": {"limits": {"cpu": 4}},
                             "env": [{"name": "A", "value": "1"}],
                             "tolerations": [{"key": "gpu", "operator": "Exists"}]}, {}, 1, 1))
    t = spec.prefill.template
    assert t.resources == {"limits": {"cpu": "4"}}
    assert t.env == [{"name": "A", "value": "1"}]
    assert t.tolerations == [{"key": "gpu", "operator": "Exists"}]
    sts = next(c for c in render(Owner("demo", "ns", "u"), validate_spec(spec)).children
               if c["kind"] == "StatefulSet" and c["metadata"]["name"] == "demo-prefill")
    assert sts["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] == "4"
