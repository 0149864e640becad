"""The Kubernetes types that spec.<pool>.template becomes, checked as the API server checks them.

A PDDeployment's `template.env`, `tolerations`, `resources` and `nodeSelector` are copied into
the pool's StatefulSet. Free-form maps here would admit values the API server then refuses on
the StatefulSet (the operator would retry forever, issue 11): these models hold what the
StatefulSet validation holds (names, quantities, operator/effect combinations, requests <=
limits), with bounded sizes so admission cost is bounded. The CRD gets their schema; the
webhook and `pdctl check` get their errors with field paths.

PodTemplateSpec keeps plain dicts (what render copies into the StatefulSet): `k8s_field`
validates a value against the model and stores its JSON form.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

MAX_ENV = 128
MAX_TOLERATIONS = 32
MAX_NODE_SELECTOR = 32
MAX_RESOURCES = 16
MAX_ENV_VALUE = 32768
ERRORS_SHOWN = 5  # per field: the rest are counted, so a huge bad list costs one short message

_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
QUALIFIED_NAME = re.compile(rf"^({_DNS_LABEL}(\.{_DNS_LABEL})*/)?{_NAME}$")
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
# resource.Quantity without a sign (container resources must not be negative); RE2-compatible.
QUANTITY = (r"^(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
            r"(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")
_SUFFIX: dict[str, Decimal | int] = {
           "": 1, "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"),
           "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
STANDARD_RESOURCES = ("cpu", "memory", "ephemeral-storage")


def quantity_value(text: str) -> Decimal:
    """The number a quantity string stands for ('500m' -> 0.5, '1Gi' -> 1073741824)."""
    m = re.match(r"^([0-9.]+)([eE][+-]?[0-9.]+|[A-Za-z]*)$", text)
    if not m:
        raise ValueError(f"not a quantity: {text!r}")
    number, suffix = m.groups()
    try:
        if suffix[:1] in ("e", "E"):
            return Decimal(number + suffix)
        return Decimal(number) * Decimal(_SUFFIX[suffix])
    except (KeyError, InvalidOperation):
        raise ValueError(f"not a quantity: {text!r}") from None


def _int_to_str(value: Any) -> Any:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


Quantity = Annotated[
    str, BeforeValidator(_int_to_str), Field(pattern=QUANTITY, max_length=64),
    # int-or-string as core/v1 Quantity is (the pattern applies to strings; the webhook checks
    # integers too)
    WithJsonSchema({"x-kubernetes-int-or-string": True, "pattern": QUANTITY, "maxLength": 64}),
]


def label_key_error(key: str) -> str | None:
    """Why `key` is not a valid label key / qualified name (None when it is)."""
    prefix, _, name = key.rpartition("/")
    if not QUALIFIED_NAME.match(key) or len(name) > 63 or len(prefix) > 253:
        return (f"{key!r} is not a qualified name (an optional DNS-subdomain prefix and '/', "
                "then at most 63 characters [A-Za-z0-9-_.], alphanumeric at both ends)")
    return None


class K8sModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid",
                              frozen=True)


class KeyRef(K8sModel):
    name: str = Field("", max_length=253, description="Name of the Secret or ConfigMap.")
    key: str = Field(min_length=1, max_length=253, description="The key to select.")
    optional: bool | None = None


class FieldRef(K8sModel):
    field_path: str = Field(min_length=1, max_length=256, description="e.g. status.podIP.")
    api_version: str | None = Field(None, max_length=64)


class ResourceFieldRef(K8sModel):
    resource: str = Field(min_length=1, max_length=253, description="e.g. limits.cpu.")
    container_name: str | None = Field(None, max_length=63)
    divisor: Quantity | None = None


class EnvVarSource(K8sModel):
    field_ref: FieldRef | None = None
    resource_field_ref: ResourceFieldRef | None = None
    config_map_key_ref: KeyRef | None = None
    secret_key_ref: KeyRef | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> EnvVarSource:
        given = [k for k in type(self).model_fields if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("valueFrom needs exactly one of fieldRef, resourceFieldRef, "
                             "configMapKeyRef, secretKeyRef")
        return self


class EnvVar(K8sModel):
    name: str = Field(min_length=1, max_length=256, pattern=ENV_NAME,
                      description="Variable name (letters, digits, '_', '-', '.').")
    value: str | None = Field(None, max_length=MAX_ENV_VALUE)
    value_from: EnvVarSource | None = None

    @model_validator(mode="after")
    def _not_both(self) -> EnvVar:
        if self.value and self.value_from is not None:
            raise ValueError("value and valueFrom are mutually exclusive")
        return self


class Toleration(K8sModel):
    key: str | None = Field(None, max_length=317)
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = Field(None, max_length=63, pattern=LABEL_VALUE)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    # int64 in core/v1; bounded where a JSON number stays exact (the CRD schema needs that)
    toleration_seconds: int | None = Field(None, ge=-(10**15), le=10**15)

    @model_validator(mode="after")
    def _consistent(self) -> Toleration:
        if self.key and (err := label_key_error(self.key)):
            raise ValueError(f"key: {err}")
        if not self.key and self.operator != "Exists":
            raise ValueError("operator must be Exists when key is empty")
        if self.operator == "Exists" and self.value:
            raise ValueError("value must be empty when operator is Exists")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError("tolerationSeconds needs effect NoExecute")
        return self


ResourceList = Annotated[dict[str, Quantity], Field(max_length=MAX_RESOURCES)]


def _resource_name_error(name: str) -> str | None:
    if "/" not in name:
        if name in STANDARD_RESOURCES or name.startswith("hugepages-"):
            return None
        return (f"{name!r}: must be cpu, memory, ephemeral-storage, hugepages-<size> or a "
                "fully qualified name such as example.com/device")
    return label_key_error(name)


class ResourceRequirements(K8sModel):
    limits: ResourceList | None = None
    requests: ResourceList | None = None

    @field_validator("limits", "requests")
    @classmethod
    def _names(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for name, amount in (value or {}).items():
            if err := _resource_name_error(name):
                raise ValueError(err)
            if "/" in name and not name.startswith("kubernetes.io/") and \
                    quantity_value(amount) != quantity_value(amount).to_integral_value():
                raise ValueError(f"{name}: an extended resource must be a whole number")
        return value

    @model_validator(mode="after")
    def _requests_within_limits(self) -> ResourceRequirements:
        limits, requests = self.limits or {}, self.requests or {}
        for name, amount in requests.items():
            if name in limits and quantity_value(amount) > quantity_value(limits[name]):
                raise ValueError(f"requests.{name} ({amount}) must be less than or equal to "
                                 f"limits.{name} ({limits[name]})")
        return self


EnvList = Annotated[list[EnvVar], Field(max_length=MAX_ENV)]
TolerationList = Annotated[list[Toleration], Field(max_length=MAX_TOLERATIONS)]
NodeSelector = Annotated[
    dict[str, Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]],
    Field(max_length=MAX_NODE_SELECTOR)]


def _summary(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False)
    lines = []
    for e in errors[:ERRORS_SHOWN]:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"]
                        if not (isinstance(p, str) and p.startswith("function-")))
        msg = e["msg"]
        if e["type"] == "string_pattern_mismatch" and QUANTITY in msg:
            msg = f"{e['input']!r} is not a quantity (e.g. 500m, 4, 16Gi)"
        lines.append(f"{where.lstrip('.') or '(value)'}: {msg}")
    more = len(errors) - len(lines)
    return "; ".join(lines) + (f"; and {more} more" if more > 0 else "")


def _node_selector_keys(value: dict[str, str]) -> dict[str, str]:
    for key in value:
        if err := label_key_error(key):
            raise ValueError(err)
    return value


def k8s_field(kind: Any) -> BeforeValidator:
    """Validate a value as `kind` (a Kubernetes type above), keep its JSON form (a dict/list),
    and give the CRD `kind`'s schema. Errors name the path inside the value."""
    adapter: TypeAdapter[Any] = TypeAdapter(kind)

    def check(value: Any) -> Any:
        try:
            parsed = adapter.validate_python(value)
        except ValidationError as exc:
            raise PydanticCustomError("kubernetes_type", "{detail}",
                                      {"detail": _summary(exc)}) from None
        return adapter.dump_python(parsed, by_alias=True, exclude_none=True)

    return BeforeValidator(check, json_schema_input_type=kind)


NODE_SELECTOR_FIELD = Annotated[
    dict[str, str], k8s_field(Annotated[NodeSelector, AfterValidator(_node_selector_keys)])]
