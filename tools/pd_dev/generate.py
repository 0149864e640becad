"""Every generated file of the repository, from the code it comes from.

    python -m pd_dev.generate          # rewrite the files that differ   (make generate)
    python -m pd_dev.generate --check  # exit 1 when a committed file differs (make check-generated)

* crds/pddeployment.yaml             - the API models (`pdctl crd` prints the same text)
* docs/compatibility.md              - the rule data (pd_runtime.compat)
* charts/pd-operator/{values.yaml, values.schema.json, README.md values table, CRD template,
  templates/_generated.tpl}          - pd_dev.chart_values (the CRD template wraps the CRD above)
"""

from __future__ import annotations

import sys
from pathlib import Path

from pd_operator.api.crd import render_crd_yaml

from . import chart_values, docs_gen

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "pddeployment.yaml"
COMPATIBILITY_DOC = ROOT / "docs" / "compatibility.md"


def outputs() -> dict[Path, str]:
    """Each generated path and the text it must hold (pure apart from reading the chart README,
    whose generated section sits between hand-written parts)."""
    crd = render_crd_yaml()
    return {CRD: crd, COMPATIBILITY_DOC: docs_gen.render(), **chart_values.outputs(crd)}


def stale(expected: dict[Path, str]) -> list[Path]:
    """The paths whose committed text differs from `expected` (or that are missing)."""
    return [p for p, text in expected.items()
            if not p.exists() or p.read_text(encoding="utf-8") != text]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    check = "--check" in argv
    expected = outputs()
    differing = stale(expected)
    for path in differing:
        rel = path.relative_to(ROOT)
        if check:
            print(f"{rel}: differs from the generated text (run: make generate)", file=sys.stderr)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(expected[path], encoding="utf-8")
            print(f"{rel}: written", file=sys.stderr)
    return 1 if differing and check else 0


if __name__ == "__main__":
    raise SystemExit(main())
