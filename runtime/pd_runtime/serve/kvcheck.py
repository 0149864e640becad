"""POST /pd/v1/kv-path-check on a decode server: prove the KV path from one prefill rank.

The operator's KVPathVerified condition calls it (no exec into pods needed), once per rank of a
TP prefill pod (rank r's side channel listens on the base port + r). The decode server
connects to the named prefill side channel exactly as a real pull does (token, hash, NIXL
metadata), asks P to stage a fresh pseudo-random pattern (selftest.PatternProbe), READs it over
NIXL into a scratch buffer of its own (never the KV cache of live requests) and compares it.

    POST /pd/v1/kv-path-check
    Authorization: Bearer <the side-channel token>
    {"version": 1, "prefill": "10.0.0.7:5600", "bytes": 4194304, "timeout_s": 20}

    200 {"version": 1, "ok": true, "prefill": "10.0.0.7:5600", "bytes": 4194304,
         "seconds": 0.012, "read_seconds": 0.003, "error": null}
    200 {"version": 1, "ok": false, ..., "error": {"code": "PatternMismatch", "message": ...}}

A check that ran answers 200 with `ok`; its failure codes: Unreachable, Timeout,
SideChannelAuthFailed, HashMismatch, VersionMismatch, PrefillRefused, ProtocolError,
PullFailed, PatternMismatch, Internal. A request that cannot run answers with its status and
the same body: 401 Unauthorized (no bearer token), 403 Forbidden (a wrong one), 400
InvalidRequest / UnsupportedVersion, 409 NotDecodeServer, 503 Loading. The token is the one the
side channel uses (a caller able to make D connect somewhere already holds the pool's secret).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Callable
from typing import Annotated, Any

import msgspec
from aiohttp import web

from ..protocol import (
    AuthError,
    ChannelClosed,
    ChannelTimeout,
    HandshakeError,
    HashMismatch,
    PeerError,
    VersionMismatch,
)
from ..selftest import DEFAULT_PATTERN_BYTES, PatternMismatch, PatternProbe

log = logging.getLogger("pd_runtime.serve.kvcheck")

KV_PATH_CHECK = "/pd/v1/kv-path-check"
WIRE_VERSION = 1
MAX_CHECK_BYTES = 16 << 20  # the probe's scratch buffer
MAX_TIMEOUT_S = 60.0


class CheckRequest(msgspec.Struct, forbid_unknown_fields=True):
    version: int
    prefill: Annotated[str, msgspec.Meta(min_length=3, max_length=270)]  # host:port, a P rank
    bytes: Annotated[int, msgspec.Meta(ge=1, le=MAX_CHECK_BYTES)] = DEFAULT_PATTERN_BYTES
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=MAX_TIMEOUT_S)] = 20.0


class CheckError(msgspec.Struct):
    code: str
    message: str


class CheckResponse(msgspec.Struct):
    version: int
    ok: bool
    prefill: str = ""
    bytes: int = 0
    seconds: float = 0.0
    read_seconds: float = 0.0
    error: CheckError | None = None


class Refused(Exception):
    """The request cannot run: an HTTP status and a named code."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def parse_address(text: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port); ValueError naming what is wrong."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"prefill {text!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or any(c.isspace() for c in host) or "/" in host:
        raise ValueError(f"prefill {text!r}: not a host name or address")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"prefill {text!r}: the port must be 1..65535")
    return host, int(port_text)


def failure_code(exc: BaseException) -> str:
    """The named failure of a check that ran (pure: exception type -> code)."""
    from ..transport import TransferError

    if isinstance(exc, PatternMismatch):
        return "PatternMismatch"
    if isinstance(exc, TransferError):
        return "PullFailed"
    if isinstance(exc, ChannelTimeout | TimeoutError):  # TimeoutError: the overall bound
        return "Timeout"
    if isinstance(exc, ChannelClosed):
        return "Unreachable"
    if isinstance(exc, AuthError):
        return "SideChannelAuthFailed"
    if isinstance(exc, HashMismatch):
        return "HashMismatch"
    if isinstance(exc, VersionMismatch):
        return "VersionMismatch"
    if isinstance(exc, PeerError):
        return "PrefillRefused"
    if isinstance(exc, HandshakeError):
        return "ProtocolError"
    return "Internal"


def _answer(status: int, body: CheckResponse) -> web.Response:
    return web.Response(status=status, body=msgspec.json.encode(body),
                        content_type="application/json")


def _refusal(exc: Refused) -> web.Response:
    return _answer(exc.status, CheckResponse(WIRE_VERSION, False,
                                             error=CheckError(exc.code, exc.message)))


def _decode_side(engine: Any) -> Any:
    """The engine's decode side (rank 0's under TP), or None on a prefill or aggregated one."""
    side = getattr(getattr(engine, "engine", None), "decode", None)
    side = getattr(side, "local", side)  # TPDecodeSide wraps rank 0's DecodeSide
    return side if all(hasattr(side, a) for a in ("spec", "factors", "token", "device")) \
        else None


def _authorize(request: web.Request, token: bytes) -> None:
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise Refused(401, "Unauthorized", "send the side-channel token as "
                                           "'Authorization: Bearer <token>'")
    if not hmac.compare_digest(given.strip().encode(), token):
        raise Refused(403, "Forbidden", "the bearer token is not this pool's side-channel token")


async def _parse(request: web.Request) -> CheckRequest:
    raw = await request.read()
    try:
        req = msgspec.json.decode(raw, type=CheckRequest)
    except msgspec.DecodeError as exc:  # ValidationError included: it names the field
        raise Refused(400, "InvalidRequest", f"invalid kv-path-check request: {exc}") from None
    if req.version != WIRE_VERSION:
        raise Refused(400, "UnsupportedVersion", f"version {req.version} is not supported "
                                                 f"(this server speaks {WIRE_VERSION})")
    try:
        parse_address(req.prefill)
    except ValueError as exc:
        raise Refused(400, "InvalidRequest", str(exc)) from None
    return req


class Checker:
    """The endpoint's state: one probe per server, one check at a time."""

    def __init__(self, engine_of: Callable[[], Any]):
        self.engine_of = engine_of
        self.probe: PatternProbe | None = None
        self.lock = asyncio.Lock()

    def _side(self) -> Any:
        engine = self.engine_of()
        if engine is None:
            raise Refused(503, "Loading", "the model is still loading")
        side = _decode_side(engine)
        if side is None:
            raise Refused(409, "NotDecodeServer", "only a decode server checks the KV path "
                                                  "(it pulls from the prefill server named)")
        return side

    async def handle(self, request: web.Request) -> web.Response:
        try:
            side = self._side()
            _authorize(request, side.token)
            req = await _parse(request)
        except Refused as exc:
            return _refusal(exc)
        async with self.lock:
            if self.probe is None:
                self.probe = PatternProbe(side.spec, side.factors, side.token, side.device,
                                          max_bytes=MAX_CHECK_BYTES)
            return _answer(200, await self._run(self.probe, req))

    async def _run(self, probe: PatternProbe, req: CheckRequest) -> CheckResponse:
        host, port = parse_address(req.prefill)
        try:
            pulled = await asyncio.wait_for(
                asyncio.to_thread(probe.pull, host, port, req.bytes, req.timeout_s),
                req.timeout_s * 2 + 5)  # the probe bounds each step by timeout_s
        except Exception as exc:  # noqa: BLE001 - every failure is answered, named
            code = failure_code(exc)
            if code == "Internal":
                log.exception("KV path check from %s failed", req.prefill)
            else:
                log.info("KV path check from %s: %s: %s", req.prefill, code, exc)
            message = str(exc) or type(exc).__name__
            return CheckResponse(WIRE_VERSION, False, req.prefill,
                                 error=CheckError(code, message))
        log.info("KV path check from %s: %d bytes in %.1f ms", req.prefill, pulled.bytes,
                 pulled.seconds * 1e3)
        return CheckResponse(WIRE_VERSION, True, req.prefill, pulled.bytes, pulled.seconds,
                             pulled.read_seconds)

    async def close(self, _app: web.Application | None = None) -> None:
        if self.probe is not None:
            await asyncio.to_thread(self.probe.close)


def install(app: web.Application, engine_of: Callable[[], Any]) -> None:
    """Route POST /pd/v1/kv-path-check on `app`; `engine_of()` is the engine, None while
    loading."""
    checker = Checker(engine_of)
    app.router.add_post(KV_PATH_CHECK, checker.handle)
    app.on_cleanup.append(checker.close)
