"""POST /pd/v1/kv-path-check without a transfer: who may call it (loading, not a decode
server, no or a wrong token), what is refused and named before anything runs, how a failed
check is named, and that an outcome is answered (the probe replaced by a fake). The transfer
itself, between real servers over NIXL: tests/runtime/test_kv_path_check.py."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from pd_runtime.protocol import AuthError, ChannelClosed, ChannelTimeout, HashMismatch, PeerError
from pd_runtime.selftest import PatternMismatch, PatternPull
from pd_runtime.serve import kvcheck
from pd_runtime.serve.app import ServerState, make_app
from pd_runtime.transport import TransferError

pytestmark = pytest.mark.timeout(30)
TOKEN = b"the-token"
PATH = kvcheck.KV_PATH_CHECK


def _engine(role: str) -> Any:
    side = SimpleNamespace(spec=None, factors={}, token=TOKEN, device="cpu")
    inner = SimpleNamespace(decode=side if role == "decode" else None)
    return SimpleNamespace(engine=inner)


class FakeProbe:
    def __init__(self, result: PatternPull | BaseException):
        self.result, self.calls = result, []

    def pull(self, host: str, port: int, nbytes: int, timeout: float) -> PatternPull:
        self.calls.append((host, port, nbytes, timeout))
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result

    def close(self) -> None:
        pass


def ask(body: Any, *, role: str = "decode", loaded: bool = True, token: str | None = "the-token",
        probe: FakeProbe | None = None, raw: bytes | None = None) -> tuple[int, dict[str, Any]]:
    async def main() -> tuple[int, dict[str, Any]]:
        state = ServerState(role=role, served_model_name="m",  # type: ignore[arg-type]
                            engine=_engine(role) if loaded else None)
        app = make_app(state)
        if probe is not None:  # the endpoint's one probe, replaced before the first check
            checker = next(r.handler.__self__ for r in app.router.routes()
                           if r.resource is not None and r.resource.canonical == PATH)
            checker.probe = probe
        async with TestClient(TestServer(app)) as client:
            headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
            r = await client.post(PATH, data=raw if raw is not None else None,
                                  json=body if raw is None else None, headers=headers)
            return r.status, await r.json()

    return asyncio.run(main())


GOOD = {"version": 1, "prefill": "10.0.0.7:5600", "bytes": 1024, "timeout_s": 3}


def test_who_may_call():
    assert ask(GOOD, loaded=False)[1]["error"]["code"] == "Loading"
    status, out = ask(GOOD, role="prefill")
    assert status == 409 and out["error"]["code"] == "NotDecodeServer"
    status, out = ask(GOOD, token=None)
    assert status == 401 and out["error"]["code"] == "Unauthorized" and out["ok"] is False
    status, out = ask(GOOD, token="the-tokem")
    assert status == 403 and out["error"]["code"] == "Forbidden"


@pytest.mark.parametrize("body, words", [
    ({**GOOD, "bytes": kvcheck.MAX_CHECK_BYTES + 1}, "bytes"),
    ({**GOOD, "timeout_s": 0}, "timeout_s"),
    ({**GOOD, "extra": 1}, "extra"),
    ({"version": 1}, "prefill"),
    ({**GOOD, "prefill": "10.0.0.7"}, "host:port"),
    ({**GOOD, "prefill": "10.0.0.7:99999"}, "port"),
    ({**GOOD, "prefill": "a b:5600"}, "host"),
])
def test_invalid_requests_are_refused_by_name(body, words):
    probe = FakeProbe(PatternPull(1, 0.1, 0.01))
    status, out = ask(body, probe=probe)
    assert status == 400 and out["error"]["code"] == "InvalidRequest", out
    assert words in out["error"]["message"]
    assert not probe.calls


def test_not_json_and_another_version():
    assert ask(None, raw=b"{not json")[1]["error"]["code"] == "InvalidRequest"
    status, out = ask({**GOOD, "version": 7})
    assert status == 400 and out["error"]["code"] == "UnsupportedVersion"


def test_an_ok_check_is_answered_with_its_measurements():
    probe = FakeProbe(PatternPull(1024, 0.004, 0.001))
    status, out = ask({**GOOD, "prefill": "[fd00::7]:5600"}, probe=probe)
    assert status == 200 and out == {"version": 1, "ok": True, "prefill": "[fd00::7]:5600",
                                     "bytes": 1024, "seconds": 0.004, "read_seconds": 0.001,
                                     "error": None}
    assert probe.calls == [("fd00::7", 5600, 1024, 3.0)]


@pytest.mark.parametrize("exc, code", [
    (PatternMismatch(1, 7, 1024), "PatternMismatch"),
    (TransferError("READ failed"), "PullFailed"),
    (ChannelClosed("cannot reach the prefill side channel"), "Unreachable"),
    (ChannelTimeout("timed out"), "Timeout"),
    (TimeoutError(), "Timeout"),
    (AuthError("wrong token"), "SideChannelAuthFailed"),
    (HashMismatch(["model"], "a" * 64, "b" * 64), "HashMismatch"),
    (PeerError("staging-full", "full"), "PrefillRefused"),
    (ZeroDivisionError("a bug"), "Internal"),
])
def test_a_failed_check_is_named(exc, code):
    status, out = ask(GOOD, probe=FakeProbe(exc))
    assert status == 200 and out["ok"] is False and out["error"]["code"] == code
    assert out["error"]["message"] and "Traceback" not in out["error"]["message"]
