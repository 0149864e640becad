"""The side-channel token Secret (issue 12, item 6): builtin pools mount it where the engine
reads it by default; the handlers create it once and keep an existing one."""

from __future__ import annotations

import asyncio
import base64
import copy

import pytest
from op_fixtures import BASE

from pd_operator import handlers, kube
from pd_operator.render import Owner, render
from pd_operator.render import secret as side_channel
from pd_operator.validate import parse_spec, validate_spec
from pd_runtime.handshake import DEFAULT_TOKEN_FILE

OWNER = Owner("demo", "ns1", "u1")
BUILTIN_IMAGE = "ghcr.io/pd-operator/pd-runtime:0.1.0"


def _statefulsets(spec: dict) -> list[dict]:
    children = render(OWNER, validate_spec(parse_spec(spec))).children
    return [c for c in children if c["kind"] == "StatefulSet"]


def _builtin_spec() -> dict:
    spec = copy.deepcopy(BASE["spec"])
    spec["engine"] = {"type": "builtin", "image": BUILTIN_IMAGE}
    return spec


def test_builtin_pools_mount_the_token_where_the_engine_reads_it():
    for sts in _statefulsets(_builtin_spec()):
        pod = sts["spec"]["template"]["spec"]
        (vol,) = [v for v in pod["volumes"] if v["name"] == side_channel.VOLUME]
        assert vol["secret"]["secretName"] == "demo-side-channel-token"
        # group-readable by the pod's fsGroup: the runtime image's user (65532) reads it
        assert vol["secret"]["defaultMode"] == 0o440
        assert pod["securityContext"]["fsGroup"] == side_channel.FS_GROUP == 65532
        (mount,) = [m for m in pod["containers"][0]["volumeMounts"]
                    if m["name"] == side_channel.VOLUME]
        path = f"{mount['mountPath']}/{vol['secret']['items'][0]['path']}"
        assert path == DEFAULT_TOKEN_FILE and mount["readOnly"] is True


def test_vllm_pools_mount_no_token():
    for sts in _statefulsets(copy.deepcopy(BASE["spec"])):
        names = {v["name"] for v in sts["spec"]["template"]["spec"]["volumes"]}
        assert side_channel.VOLUME not in names


def test_secret_carries_the_token_and_an_owner_reference():
    obj = side_channel.secret(OWNER, "s3cret")
    assert base64.b64decode(obj["data"]["token"]) == b"s3cret"
    assert obj["metadata"]["ownerReferences"][0]["uid"] == "u1"
    assert obj["metadata"]["namespace"] == "ns1"


class _Client:
    def __init__(self, status: int | None):
        self.status, self.created = status, []

    async def create(self, obj, **_):
        self.created.append(obj)
        if self.status is not None:
            raise kube.ApiError(self.status, {"message": "nope"})
        return obj


def test_ensure_token_secret_keeps_an_existing_one_and_raises_real_errors():
    ok = _Client(None)
    asyncio.run(handlers.ensure_token_secret(ok, OWNER))
    first = ok.created[0]["data"]["token"]
    asyncio.run(handlers.ensure_token_secret(ok, OWNER))
    assert ok.created[1]["data"]["token"] != first  # a fresh random value each attempt...
    asyncio.run(handlers.ensure_token_secret(_Client(409), OWNER))  # ...but an existing one wins
    with pytest.raises(kube.ApiError):
        asyncio.run(handlers.ensure_token_secret(_Client(403), OWNER))
