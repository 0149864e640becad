"""The router's RoleBinding is applied after its Role: the API server checks a binding against
the Role it names (RBAC escalation check; the chart's ServiceAccount holds the Role's
permissions, not `bind`) and answers 404 while that Role does not exist yet."""

from __future__ import annotations

import asyncio

from op_fixtures import BASE

from pd_operator import handlers, kube
from pd_operator.render import Owner, render
from pd_operator.validate import parse_spec, validate_spec


class _EscalationCheckingClient:
    """Applies like the API server for a subject without `bind`: a RoleBinding whose Role is
    not there yet is refused with 404; anything else succeeds after a yield (so concurrent
    applies interleave)."""

    def __init__(self) -> None:
        self.roles: set[str] = set()

    async def apply(self, obj):
        await asyncio.sleep(0)
        if obj["kind"] == "Role":
            await asyncio.sleep(0.01)  # a slow Role: a concurrent binding would overtake it
            self.roles.add(obj["metadata"]["name"])
        if obj["kind"] == "RoleBinding" and obj["roleRef"]["name"] not in self.roles:
            raise kube.ApiError(404, {"message": f'rolebindings "{obj["metadata"]["name"]}" '
                                                 "not found"})
        return obj


def test_role_bindings_are_applied_after_the_roles_they_name():
    children = render(Owner("demo", "ns1", "uid"), validate_spec(parse_spec(BASE["spec"]))
                      ).children
    assert {"Role", "RoleBinding"} <= {c["kind"] for c in children}
    applied, failed = asyncio.run(handlers._apply_children(
        _EscalationCheckingClient(), children, concurrency=8))
    assert not failed, failed
    assert len(applied) == len(children)
