"""`pdctl check`, `pdctl crd`, `pdctl explain` and `pdctl model-info`: offline commands that
need no cluster."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

import yaml

EXIT_OK, EXIT_REJECTED, EXIT_INVALID = 0, 1, 2
# libyaml's loader when PyYAML was built with it (about 10x faster), else the pure-Python one
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
OUTPUTS = ("table", "json", "yaml")
# Per input. The API server takes requests up to 3 MiB, so a PDDeployment is far smaller; the
# limit keeps a stray large file from costing gigabytes of memory and a minute of parsing.
DEFAULT_MAX_BYTES = 8 * 1024 * 1024


class InputError(Exception):
    """An input that cannot be read as UTF-8 text; the message names the input and why."""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive")
    return value


def read_text(path: str, max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """The UTF-8 text of a file, or of stdin for '-', at most `max_bytes` long.

    Raises InputError for a missing or unreadable file, a closed stdin, an input above the
    limit (read no further than limit + 1 bytes) and bytes that are not UTF-8.
    """
    label = "stdin" if path == "-" else path
    try:
        if path == "-":
            if sys.stdin is None:  # started with stdin closed (`<&-`)
                raise InputError("cannot read stdin: it is closed")
            data = sys.stdin.buffer.read(max_bytes + 1)
        else:
            with open(path, "rb") as fh:
                data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise InputError(f"cannot read {label}: {exc.strerror or exc}") from None
    except ValueError as exc:  # reading a stream that was closed
        raise InputError(f"cannot read {label}: {exc}") from None
    if len(data) > max_bytes:
        raise InputError(f"{label} is larger than {max_bytes} bytes (raise the limit with "
                         "--max-bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{label} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None


def register(sub) -> None:
    check = sub.add_parser("check", help="validate PDDeployment files offline",
                           description="Validate PDDeployment YAML files (multi-document; '-' "
                           "reads stdin) with the admission rules. Exit 0: all accepted; 1: "
                           "any rejected; 2: unreadable or schema-invalid input.")
    check.add_argument("files", nargs="+", metavar="FILE")
    check.add_argument("-o", "--output", choices=OUTPUTS, default="table")
    check.add_argument("--max-bytes", type=positive_int, default=DEFAULT_MAX_BYTES,
                       help=f"largest input read, per file (default {DEFAULT_MAX_BYTES})")
    check.set_defaults(func=run_check)

    crd = sub.add_parser("crd", help="print the PDDeployment CRD")
    crd.set_defaults(func=run_crd)

    explain = sub.add_parser("explain", help="print a model family's compatibility row")
    explain.add_argument("family")
    explain.add_argument("--engine-version", default=None,
                         help="vLLM version to explain (default: the newest the rules know)")
    explain.add_argument("-o", "--output", choices=OUTPUTS, default="table")
    explain.set_defaults(func=run_explain)

    info = sub.add_parser("model-info", help="print spec.model from a Hugging Face config.json")
    info.add_argument("config", metavar="CONFIG.json")
    info.add_argument("--name", default=None, help="model string to put in spec.model.name")
    info.add_argument("-o", "--output", choices=("yaml", "json"), default="yaml")
    info.add_argument("--max-bytes", type=positive_int, default=DEFAULT_MAX_BYTES,
                      help=f"largest config read (default {DEFAULT_MAX_BYTES})")
    info.set_defaults(func=run_model_info)


# --------------------------------------------------------------------------- check
@dataclass
class DocReport:
    source: str  # "FILE" or "FILE#N" for the N-th document
    body: dict[str, Any]
    errors: list[tuple[str, str]] = field(default_factory=list)

    @property
    def invalid(self) -> bool:
        return bool(self.errors)


def _documents(path: str, max_bytes: int) -> list[tuple[str, Any]]:
    """(label, parsed document) pairs; raises InputError or yaml.YAMLError."""
    docs = [d for d in yaml.load_all(read_text(path, max_bytes), Loader=YAML_LOADER)
            if d is not None]
    if len(docs) == 1:
        return [(path, docs[0])]
    return [(f"{path}#{i + 1}", d) for i, d in enumerate(docs)]


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return where + str(getattr(exc, "problem", None) or exc)


def strict_problems(doc: Any) -> list[tuple[str, str]]:
    """Schema problems under the API server's typing: no "4" or true for an integer, no "no"
    for a boolean (pydantic's default lax mode would coerce them; the CRD schema refuses)."""
    from pydantic import ValidationError

    from ..api.v1alpha1 import PDDeployment, name_error
    from ..validate import schema_errors

    if not isinstance(doc, dict):
        return []  # validate_object names the problem
    problems: list[tuple[str, str]] = []
    try:
        PDDeployment.model_validate(doc, strict=True)
    except ValidationError as exc:
        problems = schema_errors(exc)
    # The webhook and the CRD refuse such a name at creation: a file is checked as a creation.
    name = doc.get("metadata", {}).get("name") if isinstance(doc.get("metadata"), dict) else None
    if isinstance(name, str) and (err := name_error(name)):
        problems.append(("metadata.name", err))
    return problems


def check_documents(paths: list[str], max_bytes: int = DEFAULT_MAX_BYTES) -> list[DocReport]:
    from ..validate import SpecError, validate_object

    reports: list[DocReport] = []
    for path in paths:
        try:
            documents = _documents(path, max_bytes)
        except InputError as exc:
            reports.append(DocReport(path, {"name": None, "accepted": False},
                                     [("(file)", str(exc))]))
            continue
        except yaml.YAMLError as exc:
            reports.append(DocReport(path, {"name": None, "accepted": False},
                                     [("(yaml)", _yaml_problem(exc))]))
            continue
        for label, doc in documents:
            try:
                problems = strict_problems(doc)
                if problems:
                    raise SpecError(problems)
                body = validate_object(doc).to_dict()
                reports.append(DocReport(label, body))
            except SpecError as exc:
                meta = doc.get("metadata") if isinstance(doc, dict) else None
                name = meta.get("name") if isinstance(meta, dict) else None
                name = name if isinstance(name, str) else None
                reports.append(DocReport(label, {"name": name, "accepted": False},
                                         list(exc.problems)))
    return reports


def _as_json(report: DocReport) -> dict[str, Any]:
    body = {"file": report.source, **report.body}
    if report.invalid:
        body.update(verdicts=[], prefillHash=None, decodeHash=None,
                    errors=[{"path": p, "message": m} for p, m in report.errors])
    return body


def _print_table(reports: list[DocReport], out: TextIO) -> None:
    marks = {"reject": "✗", "warn": "!"}
    for r in reports:
        name = r.body.get("name") or "(unnamed)"
        if r.invalid:
            print(f"{r.source}: {name}: INVALID", file=out)
            for path, msg in r.errors:
                print(f"  {path}: {msg}", file=out)
            continue
        state = "accepted" if r.body["accepted"] else "REJECTED"
        print(f"{r.source}: {name}: {state} (rules: {r.body['rules']})", file=out)
        for v in r.body["verdicts"]:
            print(f"  {marks[v['severity']]} {v['rule']} [{', '.join(v['fields'])}]", file=out)
            print(f"      {v['message']}", file=out)
            print(f"      fix: {v['fix']}", file=out)
            print(f"      source: {v['source']}", file=out)
        p, d = r.body["prefillHash"], r.body["decodeHash"]
        if p or d:
            print(f"  hash: prefill {p or 'unknown'}, decode {d or 'unknown'}", file=out)
        for note in r.body.get("hashNotes", []):
            print(f"  hash unknown for {note}", file=out)


def run_check(args) -> int:
    reports = check_documents(args.files, args.max_bytes)
    if not reports:
        print("error: no PDDeployment documents found", file=sys.stderr)
        return EXIT_INVALID
    if args.output == "json":
        json.dump([_as_json(r) for r in reports], sys.stdout, indent=2, ensure_ascii=False)
        print()
    elif args.output == "yaml":
        yaml.safe_dump([_as_json(r) for r in reports], sys.stdout, sort_keys=False,
                       allow_unicode=True)
    else:
        _print_table(reports, sys.stdout)
    if any(r.invalid for r in reports):
        return EXIT_INVALID
    return EXIT_OK if all(r.body["accepted"] for r in reports) else EXIT_REJECTED


# --------------------------------------------------------------------------- crd
def run_crd(args) -> int:
    from ..api.crd import render_crd_yaml

    sys.stdout.write(render_crd_yaml())
    return EXIT_OK


# --------------------------------------------------------------------------- explain
def family_row(family: str, minor: tuple[int, int]) -> list[dict[str, Any]]:
    from pd_runtime.compat import matrix
    from pd_runtime.compat.rules_vllm import BY_ID

    rows = []
    for cap in matrix.CAPABILITIES:
        span = matrix.cell(family, cap, minor)
        rows.append({
            "capability": matrix.CAPABILITY_TITLES[cap],
            "status": span.status,
            "meaning": matrix.LEGEND[span.status],
            "notes": [matrix.NOTES[n] for n in span.notes],
            "rules": [{"rule": rid, "severity": BY_ID[rid].severity,
                       "summary": BY_ID[rid].summary} for rid in span.rules],
        })
    return rows


def run_explain(args) -> int:
    from pd_runtime.compat import matrix
    from pd_runtime.compat.versions import NEWEST_KNOWN, parse_version

    if args.family not in matrix.FAMILIES:
        print(f"error: unknown family {args.family!r}; one of: {', '.join(matrix.FAMILIES)}",
              file=sys.stderr)
        return EXIT_INVALID
    minor = NEWEST_KNOWN
    if args.engine_version:
        parsed = parse_version(args.engine_version)
        if parsed is None:
            print(f"error: {args.engine_version!r} is not a version (e.g. 0.33.0)",
                  file=sys.stderr)
            return EXIT_INVALID
        minor = parsed.minor
    rows = family_row(args.family, minor)
    body = {"family": args.family, "vllm": f"{minor[0]}.{minor[1]}", "capabilities": rows}
    if args.output == "json":
        print(json.dumps(body, indent=2, ensure_ascii=False))
    elif args.output == "yaml":
        yaml.safe_dump(body, sys.stdout, sort_keys=False, allow_unicode=True)
    else:
        print(f"{matrix.FAMILY_TITLES[args.family]} with NixlConnector, vLLM {body['vllm']}")
        for row in rows:
            print(f"  {row['status']} {row['capability']}: {row['meaning']}")
            for note in row["notes"]:
                print(f"      {note}")
            for rule in row["rules"]:
                print(f"      {rule['severity']:6} {rule['rule']}: {rule['summary']}")
    return EXIT_OK


# --------------------------------------------------------------------------- model-info
def run_model_info(args) -> int:
    from ..model_info import model_block_from_hf_config

    try:
        config = json.loads(read_text(args.config, args.max_bytes))
        block = model_block_from_hf_config(config, name=args.name)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except RecursionError:
        print(f"error: {args.config}: nested too deeply", file=sys.stderr)
        return EXIT_INVALID
    except json.JSONDecodeError as exc:
        print(f"error: {args.config} is not JSON: line {exc.lineno}: {exc.msg}", file=sys.stderr)
        return EXIT_INVALID
    except (ValueError, ArithmeticError, TypeError) as exc:  # values no model has (0 heads)
        print(f"error: {args.config}: {exc}", file=sys.stderr)
        return EXIT_INVALID
    if args.output == "json":
        print(json.dumps({"model": block}, indent=2))
    else:
        yaml.safe_dump({"model": block}, sys.stdout, sort_keys=False)
    return EXIT_OK
