"""The side channel on loopback, without NIXL or torch: mutual nonces (replays refused both ways),
the pre-authentication frame bound, timeouts, the connection bound, typed errors, the token."""

from __future__ import annotations

import socket
import struct
import threading
import time

import msgspec
import pytest

from pd_runtime import handshake as hs
from pd_runtime.kvcache import ModelSpec, RankSpec
from pd_runtime.protocol import (
    PROTOCOL_VERSION,
    AuthError,
    Challenge,
    ChannelBusy,
    ErrorReply,
    FrameTooLarge,
    Hello,
    MalformedMessage,
    MetaReply,
    MetaRequest,
    PeerError,
    PrepareReply,
    PrepareRequest,
    ProtocolError,
    StagingRegion,
    TokenError,
    UnexpectedMessage,
    VersionMismatch,
    WireRequest,
)

TOKEN = b"side-channel-test-token"
SPEC = RankSpec(ModelSpec(num_layers=1, num_kv_heads=2, head_size=8))


def _meta_request(agent_meta: bytes = b"agent") -> MetaRequest:
    return MetaRequest("h" * 64, {"model": "m"}, SPEC, agent_meta)


class Handler:
    """Answers meta and prepare; counts what it served; raises on request."""

    def __init__(self):
        self.calls = 0
        self.raise_next: Exception | None = None

    def __call__(self, msg, session):
        self.calls += 1
        if self.raise_next is not None:
            e, self.raise_next = self.raise_next, None
            raise e
        if isinstance(msg, MetaRequest):
            session.context = "met"
            return MetaReply("h" * 64, {"model": "m"}, SPEC, "prefill-agent",
                             b"p" * len(msg.agent_meta), StagingRegion(4096, 1 << 20, 0), 30.0)
        if session.context != "met":
            raise UnexpectedMessage("prepare before meta")
        return PrepareReply(4096, msg.num_tokens, 0, 30.0)


@pytest.fixture
def served():
    made = []

    def make(token: bytes = TOKEN, **limits):
        h = Handler()
        s = hs.SideChannelServer(token, h, limits=hs.ChannelLimits(**limits) if limits else None)
        made.append(s)
        return s, h

    yield make
    for s in made:
        s.close()


def _raw(server) -> socket.socket:
    s = socket.create_connection((server.host, server.port), timeout=5)
    s.settimeout(5)
    return s


def _read_frame(s: socket.socket) -> tuple[bytes, bytes]:
    head = _recv_exact(s, 36)
    n, mac = struct.unpack(">I32s", head)
    return mac, _recv_exact(s, n)


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def _frame(payload: bytes, mac: bytes = bytes(32)) -> bytes:
    return struct.pack(">I32s", len(payload), mac) + payload


def _refusal(s: socket.socket) -> ErrorReply:
    """The unauthenticated ErrorReply the server sends before closing."""
    mac, payload = _read_frame(s)
    assert mac == bytes(32)
    reply = msgspec.msgpack.decode(payload, type=ErrorReply)
    assert s.recv(1) == b""  # and then it closed the connection
    return reply


def _closed_within(s: socket.socket, seconds: float) -> float:
    t0 = time.monotonic()
    s.settimeout(seconds)
    while True:
        if not s.recv(4096):
            return time.monotonic() - t0


class _Recorder:
    """A TCP proxy in front of `server` that records both directions."""

    def __init__(self, server):
        self.up = (server.host, server.port)
        self.c2s, self.s2c = bytearray(), bytearray()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        c, _ = self.sock.accept()
        u = socket.create_connection(self.up)
        for a, b, log in ((c, u, self.c2s), (u, c, self.s2c)):
            threading.Thread(target=self._pump, args=(a, b, log), daemon=True).start()

    @staticmethod
    def _pump(a, b, log):
        while True:
            try:
                data = a.recv(65536)
            except OSError:
                return
            if not data:
                b.close()
                return
            log += data
            b.sendall(data)


def _fake_server(script: bytes) -> tuple[socket.socket, int]:
    """A server without the token that sends `script` (a recorded server stream) to whoever
    connects, and reads whatever comes back."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)

    def run():
        c, _ = ls.accept()
        c.sendall(script)
        c.settimeout(5)
        try:
            while c.recv(65536):
                pass
        except OSError:
            pass
        c.close()

    threading.Thread(target=run, daemon=True).start()
    return ls, ls.getsockname()[1]


# ------------------------------------------------------------------------------------------------


def test_round_trip_and_typed_replies(served):
    server, h = served()
    cl = hs.SideChannelClient(server.host, server.port, TOKEN, timeout=5)
    rep = cl.open(_meta_request())
    assert isinstance(rep, MetaReply) and rep.spec == SPEC
    rep = cl.call(PrepareRequest("r1", 7, WireRequest(7, {0: bytes(16)})))
    assert isinstance(rep, PrepareReply) and rep.nbytes == 7
    cl.close()


def test_replayed_server_reply_is_refused():
    """A fake server without the token replays a recorded session: the client's own nonce makes
    the recorded Welcome (and reply) fail authentication."""
    h = Handler()
    server = hs.SideChannelServer(TOKEN, h)
    try:
        rec = _Recorder(server)
        cl = hs.SideChannelClient("127.0.0.1", rec.port, TOKEN, timeout=5)
        cl.open(_meta_request())
        cl.close()
        time.sleep(0.2)
        assert len(rec.s2c) > 0
        fake, port = _fake_server(bytes(rec.s2c))
        with pytest.raises(AuthError):
            hs.SideChannelClient("127.0.0.1", port, TOKEN, timeout=5).open(_meta_request())
        fake.close()
    finally:
        server.close()


def test_replayed_client_session_is_refused(served):
    """A client without the token replays a recorded session: the server's fresh nonce makes the
    recorded Hello fail; the handler never runs."""
    server, h = served()
    rec = _Recorder(server)
    cl = hs.SideChannelClient("127.0.0.1", rec.port, TOKEN, timeout=5)
    cl.open(_meta_request())
    cl.close()
    time.sleep(0.2)
    calls = h.calls
    s = _raw(server)
    _read_frame(s)  # the new challenge
    s.sendall(bytes(rec.c2s))
    assert _refusal(s).code == "auth"
    assert h.calls == calls
    assert server.auth_failures == 1


def test_wrong_token_refused_both_ways(served):
    server, h = served()
    with pytest.raises(AuthError):
        hs.SideChannelClient(server.host, server.port, b"not-the-token", timeout=5)
    assert server.auth_failures == 1 and h.calls == 0


def test_preauth_frame_is_bounded(served):
    """Before authentication the server refuses any frame over 4 KiB from its header alone."""
    server, _ = served()
    s = _raw(server)
    _read_frame(s)
    s.sendall(struct.pack(">I32s", 64 << 20, bytes(32)))  # announces 64 MiB, sends nothing more
    reply = _refusal(s)
    assert reply.code == "frame-too-large" and "4096" in reply.message
    s = _raw(server)
    _read_frame(s)
    s.sendall(_frame(b"\x00" * (hs.PREAUTH_MAX_FRAME + 1)))
    assert _refusal(s).code == "frame-too-large"


def test_large_frames_only_after_authentication(served):
    server, _ = served(max_frame=64 << 10)
    cl = hs.SideChannelClient(server.host, server.port, TOKEN, timeout=5)
    rep = cl.open(_meta_request(b"m" * (32 << 10)))  # 32 KiB: fine once authenticated
    assert len(rep.agent_meta) == 32 << 10
    with pytest.raises(FrameTooLarge):  # over the authenticated bound: refused, closed
        cl.call(_meta_request(b"m" * (128 << 10)))


def test_handshake_total_timeout(served):
    """Silent, and slowly dribbling, unauthenticated connections are closed at the handshake
    deadline, not held open."""
    server, _ = served(auth_timeout_s=0.4)
    s = _raw(server)
    _read_frame(s)
    assert _closed_within(s, 5) < 2
    s = _raw(server)
    _read_frame(s)
    hello = msgspec.msgpack.encode(Hello(PROTOCOL_VERSION, b"n" * 16))
    frame = _frame(hello)
    t0 = time.monotonic()
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        for b in frame:  # one byte every 50 ms: each recv is quick, the whole is too slow
            s.sendall(bytes([b]))
            time.sleep(0.05)
    assert time.monotonic() - t0 < 2


def test_idle_timeout_and_transparent_reconnect(served):
    server, h = served(idle_timeout_s=0.4)
    cl = hs.SideChannelClient(server.host, server.port, TOKEN, timeout=5)
    cl.open(_meta_request())
    time.sleep(0.8)  # the server closes the idle connection
    rep = cl.call(PrepareRequest("r1", 3, WireRequest(3, {0: bytes(8)})))
    assert isinstance(rep, PrepareReply)  # reconnected, replayed meta, then served
    assert h.calls == 3


def test_connection_lifetime_is_bounded_without_failing_calls(served):
    """The server closes connections older than their lifetime between requests; the client
    sees it coming (the Welcome announced it) and reconnects first: no call fails."""
    server, h = served(lifetime_s=0.6)
    cl = hs.SideChannelClient(server.host, server.port, TOKEN, timeout=5)
    cl.open(_meta_request())
    end = time.monotonic() + 1.5
    while time.monotonic() < end:
        rep = cl.call(PrepareRequest("r1", 3, WireRequest(3, {0: bytes(8)})))
        assert isinstance(rep, PrepareReply)
        time.sleep(0.05)
    assert server.sessions >= 2  # busy all along, and still renewed
    # a client that ignores the announced lifetime is cut off by the server
    cl._lifetime_s = float("inf")
    time.sleep(0.8)
    with pytest.raises(hs.ChannelClosed):
        cl.call(PrepareRequest("r1", 3, WireRequest(3, {0: bytes(8)})))


def test_frame_timeout_after_authentication(served):
    server, _ = served(frame_timeout_s=0.3)
    cl = hs.SideChannelClient(server.host, server.port, TOKEN, timeout=5)
    cl.open(_meta_request())
    assert cl._sock is not None
    cl._sock.sendall(struct.pack(">I", 100))  # half a header, then nothing
    assert _closed_within(cl._sock, 5) < 2


def test_unauthenticated_flood_does_not_block_a_real_client(served):
    server, h = served()
    flood = []
    for i in range(24):
        s = _raw(server)
        _read_frame(s)
        if i % 2:  # half announce a 64 MiB frame, half stay silent
            s.sendall(struct.pack(">I32s", 64 << 20, bytes(32)))
        flood.append(s)
    t0 = time.monotonic()
    cl = hs.SideChannelClient(server.host, server.port, TOKEN, timeout=5)
    assert isinstance(cl.open(_meta_request()), MetaReply)
    assert time.monotonic() - t0 < 2
    for s in flood:
        s.close()


def test_connection_bound(served):
    server, _ = served(max_connections=2)
    held = [_raw(server), _raw(server)]
    for s in held:
        _read_frame(s)
    with pytest.raises(ChannelBusy):
        hs.SideChannelClient(server.host, server.port, TOKEN, timeout=5)
    for s in held:
        s.close()


def test_version_mismatch_named_both_ways(served):
    server, _ = served()
    s = _raw(server)
    _read_frame(s)
    s.sendall(_frame(msgspec.msgpack.encode(Hello(PROTOCOL_VERSION + 1, b"n" * 16))))
    reply = _refusal(s)
    assert reply.code == "version" and reply.version == PROTOCOL_VERSION
    assert str(PROTOCOL_VERSION + 1) in reply.message
    fake, port = _fake_server(_frame(msgspec.msgpack.encode(Challenge(99, b"n" * 16))))
    with pytest.raises(VersionMismatch) as e:
        hs.SideChannelClient("127.0.0.1", port, TOKEN, timeout=5)
    assert e.value.local == PROTOCOL_VERSION and e.value.remote == 99
    fake.close()


def test_malformed_preauth_is_a_typed_refusal(served):
    server, _ = served()
    for junk in (b"\xc1", msgspec.msgpack.encode({"type": "hello"}),
                 msgspec.msgpack.encode({"type": "meta-reply"}), b""):
        s = _raw(server)
        _read_frame(s)
        s.sendall(_frame(junk))
        assert _refusal(s).code == "malformed"


def test_malformed_and_unexpected_after_auth_answered_and_served_on(served):
    server, h = served()
    cl = hs.SideChannelClient(server.host, server.port, TOKEN, timeout=5)
    cl.open(_meta_request())
    for bad, err in ((b"\xc1", MalformedMessage), (msgspec.msgpack.encode(Hello(2, b"n" * 16)),
                     UnexpectedMessage)):
        cl.lock.acquire()
        assert cl._ch is not None
        cl._ch.send_payload(bad)
        cl.lock.release()
        cl.lock.acquire()  # finish() releases it
        with pytest.raises(err):
            cl.finish()
    rep = cl.call(PrepareRequest("r1", 3, WireRequest(3, {0: bytes(8)})))
    assert isinstance(rep, PrepareReply)


def test_handler_exception_is_a_typed_reply_not_a_traceback(served):
    server, h = served()
    cl = hs.SideChannelClient(server.host, server.port, TOKEN, timeout=5)
    cl.open(_meta_request())
    h.raise_next = KeyError("boom")
    with pytest.raises(PeerError) as e:
        cl.call(PrepareRequest("r1", 3, WireRequest(3, {0: bytes(8)})))
    assert e.value.code == "internal" and "KeyError" in str(e.value)
    assert "Traceback" not in str(e.value)
    assert isinstance(cl.call(PrepareRequest("r1", 3, WireRequest(3, {0: bytes(8)}))), PrepareReply)


def test_prepare_before_meta_is_refused(served):
    server, _ = served()
    cl = hs.SideChannelClient(server.host, server.port, TOKEN, timeout=5)
    with pytest.raises(UnexpectedMessage):
        cl.call(PrepareRequest("r1", 3, WireRequest(3, {0: bytes(8)})))


def test_request_fields_are_validated():
    for bad in ({"type": "prepare", "req_id": "a:b", "num_tokens": 1,
                 "p_req": {"num_tokens": 1, "block_tables": {}}},
                {"type": "prepare", "req_id": "r", "num_tokens": -1,
                 "p_req": {"num_tokens": 1, "block_tables": {}}},
                {"type": "hello", "version": 2, "nonce": b"short"},
                {"type": "prepare", "req_id": "r", "num_tokens": 1, "extra": 1,
                 "p_req": {"num_tokens": 1, "block_tables": {}}},
                # version 2's tables (a list of ints per group) are not packed bytes
                {"type": "prepare", "req_id": "r", "num_tokens": 1,
                 "p_req": {"num_tokens": 1, "block_tables": {0: [1, 2]}}}):
        with pytest.raises(msgspec.ValidationError):
            hs._FROM_CLIENT.decode(msgspec.msgpack.encode(bad))
    assert issubclass(MalformedMessage, ProtocolError)


@pytest.mark.parametrize("token", [b"", b"  \n", "", None])
def test_empty_or_missing_token_refused_at_start(token):
    with pytest.raises(TokenError):
        hs.SideChannelServer(token, Handler())  # type: ignore[arg-type]
    with pytest.raises(TokenError):
        hs.SideChannelClient("127.0.0.1", 1, token)  # type: ignore[arg-type]


def test_load_token_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("PD_RUNTIME_TOKEN", raising=False)
    f = tmp_path / "token"
    monkeypatch.setenv("PD_RUNTIME_TOKEN_FILE", str(f))
    with pytest.raises(TokenError, match="does not exist"):
        hs.load_token()
    f.write_bytes(b" \n")
    with pytest.raises(TokenError, match="empty"):
        hs.load_token()
    f.write_bytes(b"s3cret\n")
    assert hs.load_token() == b"s3cret"
    monkeypatch.setenv("PD_RUNTIME_TOKEN", "")
    with pytest.raises(TokenError, match="PD_RUNTIME_TOKEN is set but empty"):
        hs.load_token()
    monkeypatch.setenv("PD_RUNTIME_TOKEN", "env-token")
    assert hs.load_token() == b"env-token"
    with pytest.raises(TokenError):
        hs.load_token("")
