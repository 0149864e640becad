"""Generated files stay in sync with the data they come from."""

from pathlib import Path

from pd_dev import docs_gen
from pd_operator.api.crd import build_crd, render_crd_yaml

ROOT = Path(__file__).parents[2]


def test_committed_crd_is_generated():
    committed = (ROOT / "crds" / "pddeployment.yaml").read_text(encoding="utf-8")
    assert committed == render_crd_yaml(), "run: make generate"


def test_committed_compatibility_doc_is_generated():
    committed = (ROOT / "docs" / "compatibility.md").read_text(encoding="utf-8")
    assert committed == docs_gen.render(), "run: make generate"


def _walk(node, path="schema"):
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


def test_crd_schema_is_structural():
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert "$ref" not in node and "anyOf" not in node and "allOf" not in node, path
        assert not ("properties" in node and "additionalProperties" in node), path
        if "properties" in node and not path.endswith(".properties"):
            assert node.get("type") == "object", path


def test_crd_names_and_columns():
    crd = build_crd()
    assert crd["spec"]["names"]["shortNames"] == ["pdd"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    names = [c["name"] for c in version["additionalPrinterColumns"]]
    assert names[:3] == ["Phase", "P-Ready", "D-Ready"] and names[-1] == "Age"
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["properties"]["model"]["properties"]["numKVHeads"]["description"]
    assert spec["properties"]["prefill"]["x-kubernetes-validations"]
