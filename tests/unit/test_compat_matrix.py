"""The matrix data reproduces the upstream page cell by cell, and every unsupported cell is
enforced by a rule that covers it."""

import re
from pathlib import Path

import pytest

from pd_runtime.compat import matrix, rules_vllm
from pd_runtime.compat.versions import NEWEST_KNOWN, OLDEST_KNOWN

PAGE = Path(__file__).parents[1] / "data" / "nixl_connector_compatibility.md"
TITLE_TO_FAMILY = {v: k for k, v in matrix.FAMILY_TITLES.items()}


def page_rows() -> dict[str, list[str]]:
    rows = {}
    for line in PAGE.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in TITLE_TO_FAMILY:
            rows[TITLE_TO_FAMILY[cells[0]]] = cells[1:]
    return rows


def page_footnotes() -> set[int]:
    text = PAGE.read_text(encoding="utf-8")
    return {int(n) for n in re.findall(r"^<sup>(\d+)</sup>", text, flags=re.M)}


def test_page_has_every_family():
    assert set(page_rows()) == set(matrix.FAMILIES)


@pytest.mark.parametrize("family", matrix.FAMILIES)
@pytest.mark.parametrize("index,capability", list(enumerate(matrix.CAPABILITIES)))
def test_cell_matches_page(family, index, capability):
    expected = page_rows()[family][index]
    got = matrix.cell_text(matrix.cell(family, capability, matrix.PAGE_VERSION))
    assert got == expected, f"{family}/{capability}"


def test_rendered_table_equals_page_rows():
    rendered = matrix.render_markdown(matrix.PAGE_VERSION).splitlines()[2:]
    rows = page_rows()
    for line, family in zip(rendered, matrix.FAMILIES, strict=False):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert cells[1:] == rows[family]


def test_every_page_footnote_is_used_and_explained():
    assert page_footnotes() == set(matrix.used_notes(matrix.PAGE_VERSION))
    assert page_footnotes() <= set(matrix.NOTES)


def test_every_version_has_a_cell():
    for minor in range(OLDEST_KNOWN[1], NEWEST_KNOWN[1] + 1):
        for fam in matrix.FAMILIES:
            for cap in matrix.CAPABILITIES:
                matrix.cell(fam, cap, (0, minor))


def test_unsupported_cells_are_enforced_by_rules_in_range():
    for fam in matrix.FAMILIES:
        for cap in matrix.CAPABILITIES:
            for span in matrix.MATRIX[fam][cap]:
                for rid in span.rules:
                    assert rid in rules_vllm.BY_ID, rid
                if span.status not in (matrix.UNSUPPORTED, matrix.WIP, matrix.UNKNOWN):
                    continue
                assert span.rules, f"{fam}/{cap} {span.status} has no enforcing rule"
                enforcing = [rules_vllm.BY_ID[r] for r in span.rules]
                for minor in range(OLDEST_KNOWN[1], NEWEST_KNOWN[1] + 1):
                    if span.versions.contains((0, minor)):
                        assert any(r.applies_to(fam, (0, minor)) for r in enforcing), \
                            f"{fam}/{cap} at 0.{minor}"


def test_one_family_list():
    """The matrix rows and the CRD enum are compat.FAMILIES (the matrix in the page's order)."""
    from pd_operator.api.crd import build_crd
    from pd_runtime.compat import FAMILIES

    assert sorted(matrix.FAMILIES) == sorted(FAMILIES) == sorted(matrix.MATRIX)
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    family = schema["properties"]["spec"]["properties"]["model"]["properties"]["family"]
    assert tuple(family["enum"]) == FAMILIES
