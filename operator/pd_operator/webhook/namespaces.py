"""Per-namespace forbidden validation policies: the namespace label FORBID_LABEL.

A namespace opts in with `pd-operator.dev/forbid-validation-policies: Disabled.Warn` (label
values cannot hold commas: the names are separated by dots). The webhook adds these to the
cluster-wide `--forbid-validation-policies`. The label is read with a list of namespaces
filtered to one name (fieldSelector metadata.name): the operator's ClusterRole already grants
`list` on namespaces (kopf needs it), so this adds no RBAC; `get` is not granted and not used.
Each namespace's answer is cached for CACHE_TTL_S, so a label change takes effect within that.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

FORBID_LABEL = "pd-operator.dev/forbid-validation-policies"
FORBIDDABLE = ("Warn", "Disabled")  # Strict, the default, cannot be forbidden
CACHE_TTL_S = 30.0
MAX_CACHED = 10_000  # namespaces remembered at once (the cache starts over beyond it)

ReadLabels = Callable[[str], Awaitable[dict[str, str]]]


class NamespaceUnreadable(Exception):
    """The namespace's labels could not be read and nothing is cached for it."""


def policies_from_label(value: str) -> frozenset[str]:
    """The forbidden policies a label value names; unknown names are ignored (and logged), so
    a typo never forbids Strict nor breaks admission."""
    names = {n.strip() for n in value.split(".") if n.strip()}
    unknown = names - set(FORBIDDABLE)
    if unknown:
        log.warning("namespace label %s=%r: ignoring %s (allowed: %s)", FORBID_LABEL, value,
                    ", ".join(sorted(unknown)), ", ".join(FORBIDDABLE))
    return frozenset(names & set(FORBIDDABLE))


class NamespacePolicies:
    """Cached lookup of the policies a namespace's label forbids."""

    def __init__(self, read: ReadLabels, ttl: float = CACHE_TTL_S,
                 clock: Callable[[], float] = time.monotonic):
        self._read, self._ttl, self._clock = read, ttl, clock
        self._cache: dict[str, tuple[float, frozenset[str]]] = {}

    async def forbidden(self, namespace: str) -> frozenset[str]:
        if not namespace:
            return frozenset()
        cached = self._cache.get(namespace)
        if cached is not None and self._clock() - cached[0] < self._ttl:
            return cached[1]
        try:
            labels = await self._read(namespace)
        except Exception as exc:
            if cached is not None:  # keep the last answer rather than drop the admin's choice
                return cached[1]
            raise NamespaceUnreadable(f"could not read the labels of namespace {namespace!r} "
                                      f"({type(exc).__name__}: {exc})") from None
        value = policies_from_label(str(labels.get(FORBID_LABEL, "")))
        if len(self._cache) >= MAX_CACHED:
            self._cache.clear()
        self._cache[namespace] = (self._clock(), value)
        return value


def label_reader(client: Any) -> ReadLabels:
    """Read one namespace's labels through `list` (a kube.Client)."""
    async def read(namespace: str) -> dict[str, str]:
        out = await client.request("GET", "/api/v1/namespaces",
                                   params={"fieldSelector": f"metadata.name={namespace}"})
        items = (out or {}).get("items") or []
        return dict((items[0].get("metadata") or {}).get("labels") or {}) if items else {}
    return read
