"""Validate one PDDeployment document: schema, then the compatibility rules (pure).

The admission webhook and `pdctl check` both call `validate_object`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from pd_runtime.compat import Decision, ResolvedPool, check_pools

from .api.v1alpha1 import PDDeployment, PDDeploymentSpec
from .resolve import resolve


class SpecError(ValueError):
    """The document does not match the PDDeployment schema; `problems` are (path, message)."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{p}: {m}" for p, m in problems))


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before") or str(part).startswith("literal["):
            continue
        elif part == "" or not str(part).replace("-", "_").isidentifier():
            out += f"[{str(part)!r}]"  # keys that are not plain names stay readable
        else:
            out += f".{part}" if out else str(part)
    return out or "(document)"


def schema_errors(exc: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for err in exc.errors(include_url=False):
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif err["type"] == "literal_error":
            msg = f"must be one of {err['ctx']['expected']}" if "ctx" in err else msg
        problems.append((_path(err["loc"]), msg))
    return problems


def parse_object(obj: Any) -> PDDeployment:
    if not isinstance(obj, dict):
        raise SpecError([("(document)", f"expected a mapping, got {type(obj).__name__}")])
    try:
        return PDDeployment.model_validate(obj)
    except ValidationError as exc:
        raise SpecError(schema_errors(exc)) from None


def parse_spec(spec: Any) -> PDDeploymentSpec:
    try:
        return PDDeploymentSpec.model_validate(spec)
    except ValidationError as exc:
        raise SpecError([(f"spec.{p}", m) for p, m in schema_errors(exc)]) from None


@dataclass
class Result:
    name: str
    decision: Decision
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def accepted(self) -> bool:
        return self.decision.accepted

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.decision.to_dict()}


@dataclass(frozen=True)
class Validated:
    """A spec that passed the schema, resolved into its two pools, with the rules' decision:
    what `render` takes (it evaluates no rule itself)."""

    spec: PDDeploymentSpec
    prefill: ResolvedPool
    decode: ResolvedPool
    decision: Decision


def validate_spec(spec: PDDeploymentSpec) -> Validated:
    """Resolve the pools and judge them under the spec's validation policy."""
    prefill, decode = resolve(spec)
    return Validated(spec, prefill, decode, check_pools(prefill, decode, spec.validation.policy))


def decide_spec(spec: PDDeploymentSpec) -> Decision:
    return validate_spec(spec).decision


def validate_object(obj: Any) -> Result:
    """Raises SpecError for schema problems; otherwise returns the decision."""
    pdd = parse_object(obj)
    name = str(pdd.metadata.get("name") or "(unnamed)")
    return Result(name=name, decision=decide_spec(pdd.spec))
