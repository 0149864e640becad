"""The side channel: TCP, length-prefixed msgpack frames (protocol.py), authenticated both ways.

Prefill serves; decode connects. Both sides contribute a nonce, and both prove they hold the
shared token (from a Kubernetes Secret: env PD_RUNTIME_TOKEN or a file) before anything else:

    S -> C  Challenge(version, nonce_s)   no MAC                   at most 4 KiB
    C -> S  Hello(version, nonce_c)       MAC(K, "C", seq 0)       at most 4 KiB, verified first
    S -> C  Welcome(idle, lifetime)       MAC(K, "S", seq 0)
    then requests MAC(K, "C", n) and replies MAC(K, "S", n), n = 1, 2, ...

    K = HMAC-SHA256(token, "pd-runtime side channel" | version | nonce_s | nonce_c)
    frame = u32 length | 32-byte MAC | payload; MAC = HMAC-SHA256(K, direction | u64 seq | payload)

What this gives: a peer without the token can produce neither a valid Hello (the server refuses
it) nor a valid Welcome or reply (the client refuses it). Frames recorded on one connection do not
verify on another, in either direction: the server's fresh nonce defeats a replayed Hello, the
client's fresh nonce defeats a replayed Welcome or reply. Within a connection the sequence
number refuses replayed or reordered frames and the direction refuses reflected ones. The
protocol versions are compared before the key is used; a mismatch names both versions.

What it does not give: confidentiality (frames are plain msgpack; they carry addresses and
metadata, not KV, which moves over NIXL) and protection against someone on the path who drops
or delays frames (they can always cut the connection).

Bounds: before Hello is verified the server reads at most PREAUTH_MAX_FRAME bytes per frame and
the handshake must finish within `auth_timeout_s` in total. After it, a frame is at most
`max_frame` bytes and must arrive within `frame_timeout_s` once begun; a connection idle for
`idle_timeout_s`, or older than `lifetime_s`, is closed between requests. The Welcome announces
both, and the client reconnects before a call that would cross either (replaying its opening
message), so neither fails a request. At most `max_connections` connections at once. A missing
or empty token refuses to start.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import msgspec

from .compat.hashing import differing_factors
from .protocol import (
    NONCE_BYTES,
    PROTOCOL_VERSION,
    AuthError,
    ChannelBusy,
    ChannelClosed,
    ChannelTimeout,
    Challenge,
    ClientMessage,
    ErrorReply,
    FrameTooLarge,
    HandshakeError,
    HashMismatch,
    Hello,
    MalformedMessage,
    MetaRequest,
    PatternRequest,
    PrepareRequest,
    ServerMessage,
    TokenError,
    UnexpectedMessage,
    VersionMismatch,
    Welcome,
    error_from_reply,
    error_reply,
)

log = logging.getLogger(__name__)

PREAUTH_MAX_FRAME = 4 << 10
MAX_FRAME = 16 << 20
DEFAULT_TOKEN_FILE = "/var/run/secrets/pd-runtime/token"
_HEADER = struct.Struct(">I32s")
_SEQ = struct.Struct(">Q")
_NO_MAC = bytes(32)
_KEY_LABEL = b"pd-runtime side channel"
_ENCODER = msgspec.msgpack.Encoder()
_FROM_CLIENT = msgspec.msgpack.Decoder(ClientMessage)
_FROM_SERVER = msgspec.msgpack.Decoder(ServerMessage)

ClientRequest = MetaRequest | PrepareRequest | PatternRequest
Handler = Callable[[ClientRequest, "Session"], Any]


@dataclass(frozen=True)
class ChannelLimits:
    auth_timeout_s: float = 5.0  # accept -> verified Hello, in total
    idle_timeout_s: float = 300.0  # authenticated, between frames
    lifetime_s: float = 3600.0  # authenticated, in total (closed between requests)
    frame_timeout_s: float = 30.0  # one frame, from its first byte to its last
    max_frame: int = MAX_FRAME  # after authentication
    max_connections: int = 256


@dataclass
class Session:
    """One authenticated connection, as the handler sees it; `context` is the handler's own."""

    peer: tuple[str, int]
    context: Any = None


# ------------------------------------------------------------------------------------------------
# the token


def require_token(token: bytes | str | None, why: str = "the side-channel token is empty") -> bytes:
    """The token as bytes; an empty (or whitespace-only) one is refused."""
    if token is None:
        raise TokenError("no side-channel token given")
    raw = token.encode() if isinstance(token, str) else bytes(token)
    if not raw.strip():
        raise TokenError(f"{why}: refusing to run the side channel without a secret")
    return raw


def load_token(explicit: bytes | str | None = None) -> bytes:
    """The token: `explicit`, else env PD_RUNTIME_TOKEN, else the file PD_RUNTIME_TOKEN_FILE names
    (default: the mounted Secret). Missing or empty is a TokenError, never an empty key."""
    if explicit is not None:
        return require_token(explicit)
    env = os.environ.get("PD_RUNTIME_TOKEN")
    if env is not None:
        return require_token(env, "PD_RUNTIME_TOKEN is set but empty")
    path = os.environ.get("PD_RUNTIME_TOKEN_FILE", DEFAULT_TOKEN_FILE)
    try:
        with open(path, "rb") as f:
            data = f.read(64 << 10).strip()
    except FileNotFoundError:
        raise TokenError(f"no side-channel token: set PD_RUNTIME_TOKEN or PD_RUNTIME_TOKEN_FILE "
                         f"(from a Secret); {path} does not exist") from None
    except OSError as e:
        raise TokenError(f"cannot read the side-channel token file {path}: {e}") from None
    return require_token(data, f"the side-channel token file {path} is empty")


def session_key(token: bytes, nonce_s: bytes, nonce_c: bytes) -> bytes:
    label = _KEY_LABEL + struct.pack(">I", PROTOCOL_VERSION)
    return hmac.new(token, label + nonce_s + nonce_c, hashlib.sha256).digest()


# ------------------------------------------------------------------------------------------------
# frames


class _Frames:
    """Length-prefixed frames on one socket; every read runs against a deadline.

    The socket is non-blocking and waits go through poll() only when nothing is there: with a
    socket timeout each read cost a settimeout, a poll and a recv (three reads a frame: nine
    system calls), and most reads find their bytes already arrived. TCP_NODELAY: a frame is one
    write and the peer waits for it."""

    def __init__(self, sock: socket.socket, send_s: float = 30.0):
        self.sock = sock
        self.send_s = send_s
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def _wait(self, events: int, by: float, what: str) -> None:
        left = by - time.monotonic()
        if left <= 0:
            raise ChannelTimeout(f"side channel: timed out {what}")
        p = select.poll()
        p.register(self.sock, events)
        p.poll(max(1, int(left * 1000 + 1)))

    def send(self, mac: bytes, payload: bytes) -> None:
        data = memoryview(_HEADER.pack(len(payload), mac) + payload)
        by = time.monotonic() + self.send_s
        while data:
            try:
                k = self.sock.send(data)
            except BlockingIOError:
                self._wait(select.POLLOUT, by, "sending")
                continue
            except OSError as e:
                raise ChannelClosed(f"side channel: send failed: {e}") from e
            data = data[k:]

    def recv(self, limit: int, first_byte_by: float, frame_s: float,
             total_by: float = float("inf")) -> tuple[bytes, bytes]:
        """(mac, payload). Waits until `first_byte_by` for the frame to begin, then `frame_s`
        (never past `total_by`) for all of it; a length above `limit` is refused before any of
        the payload is read."""
        head, by = self._read(_HEADER.size, min(first_byte_by, total_by), frame_s, total_by)
        n, mac = _HEADER.unpack(head)
        if n > limit:
            raise FrameTooLarge(f"frame of {n} bytes exceeds the limit of {limit} bytes")
        return mac, self._read(n, by)[0]

    def _read(self, n: int, by: float, frame_s: float | None = None,
              total_by: float = float("inf")) -> tuple[bytes, float]:
        """n bytes by `by`; with `frame_s`, the deadline becomes now + frame_s (at most
        `total_by`) once the first byte is in. Returns the bytes and the deadline in force."""
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        if frame_s is not None:  # a frame's start: its bytes are rarely here yet, wait first
            self._wait(select.POLLIN, by, "waiting for the peer")
        while got < n:
            try:
                k = self.sock.recv_into(view[got:], n - got)
            except BlockingIOError:
                self._wait(select.POLLIN, by, "waiting for the peer")
                continue
            except OSError as e:
                raise ChannelClosed(f"side channel: {e}") from e
            if k == 0:
                raise ChannelClosed("side channel closed by the peer")
            if got == 0 and frame_s is not None:
                by = min(time.monotonic() + frame_s, total_by)
            got += k
        return bytes(buf), by


class _Channel:
    """One authenticated direction pair: MACs, sequence numbers, typed messages."""

    def __init__(self, frames: _Frames, key: bytes, send_dir: bytes, recv_dir: bytes):
        self.frames, self.key = frames, key
        self.send_dir, self.recv_dir = send_dir, recv_dir
        self.sseq = self.rseq = 0

    def _mac(self, direction: bytes, seq: int, payload: bytes) -> bytes:
        return hmac.new(self.key, direction + _SEQ.pack(seq) + payload, hashlib.sha256).digest()

    def send(self, msg: Any) -> None:
        self.send_payload(_ENCODER.encode(msg))

    def send_payload(self, payload: bytes) -> None:
        mac = self._mac(self.send_dir, self.sseq, payload)
        self.sseq += 1
        self.frames.send(mac, payload)

    def authentic(self, mac: bytes, payload: bytes) -> bool:
        if not hmac.compare_digest(mac, self._mac(self.recv_dir, self.rseq, payload)):
            return False
        self.rseq += 1
        return True


def _decode(decoder: msgspec.msgpack.Decoder, payload: bytes, side: str) -> Any:
    try:
        return decoder.decode(payload)
    except msgspec.DecodeError as e:  # ValidationError included
        raise MalformedMessage(f"malformed message from the {side}: {e}") from None


def _send_unauthenticated(frames: _Frames, reply: ErrorReply, linger: bool = True) -> None:
    """A refusal sent before (or instead of) authentication, then a lingering close: a little
    of what the peer already sent is read and dropped (at most 64 KiB for 0.5 s) so that the
    close does not reset the connection before the peer has read the refusal."""
    sock = frames.sock
    try:
        sock.settimeout(1.0 if linger else 0.05)
        sock.sendall(_frame(_NO_MAC, _ENCODER.encode(reply)))
        sock.shutdown(socket.SHUT_WR)
        if not linger:
            return
        by, left = time.monotonic() + 0.5, 64 << 10
        while left > 0 and time.monotonic() < by:
            sock.settimeout(max(0.01, by - time.monotonic()))
            chunk = sock.recv(min(left, 16 << 10))
            if not chunk:
                break
            left -= len(chunk)
    except OSError:
        pass


def _frame(mac: bytes, payload: bytes) -> bytes:
    return _HEADER.pack(len(payload), mac) + payload


# ------------------------------------------------------------------------------------------------
# prefill side


class SideChannelServer:
    """Prefill side. `handler(request, session) -> reply` runs per authenticated request; a
    HandshakeError it raises is answered as a typed ErrorReply, anything else as `internal`.
    `on_close(session)` runs once when an authenticated connection ends, however it ends."""

    def __init__(self, token: bytes, handler: Handler, host: str = "127.0.0.1", port: int = 0,
                 limits: ChannelLimits | None = None,
                 on_close: Callable[[Session], None] | None = None):
        self.token = require_token(token)
        self.handler = handler
        self.on_close = on_close
        self.limits = limits or ChannelLimits()
        self.auth_failures = 0
        self.sessions = 0  # connections authenticated
        self.refused = 0  # connections refused or closed for any protocol reason
        self._slots = threading.BoundedSemaphore(self.limits.max_connections)
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(64)
        self.host, self.port = self.sock.getsockname()[:2]
        self._stop = False
        self._thread = threading.Thread(target=self._accept_loop, daemon=True,
                                        name=f"side-channel-{self.port}")
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._stop:
            try:
                s, addr = self.sock.accept()
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                self.refused += 1
                _send_unauthenticated(_Frames(s), error_reply(ChannelBusy(  # never blocks accept
                    f"{self.limits.max_connections} side-channel connections already open")),
                    linger=False)
                s.close()
                continue
            with self._conns_lock:
                self._conns.add(s)
            threading.Thread(target=self._serve, args=(s, addr), daemon=True).start()

    def _serve(self, s: socket.socket, addr: tuple[str, int]) -> None:
        frames = _Frames(s, self.limits.frame_timeout_s)
        end_by = time.monotonic() + self.limits.lifetime_s
        session: Session | None = None
        try:
            ch = self._authenticate(frames)
            session = Session((addr[0], addr[1]))
            self._requests(ch, session, end_by)
        except (ChannelClosed, ChannelTimeout):
            pass  # the peer went away, or was too slow: nothing to answer
        except HandshakeError as e:
            self.refused += 1
            log.info("side channel %s:%s refused: %s", addr[0], addr[1], e)
            _send_unauthenticated(frames, error_reply(e))
        except Exception:  # noqa: BLE001 - a bug here must not take the server down
            log.exception("side channel %s:%s failed", addr[0], addr[1])
        finally:
            with self._conns_lock:
                self._conns.discard(s)
            s.close()
            self._slots.release()
            if session is not None and self.on_close is not None:
                try:
                    self.on_close(session)
                except Exception:  # noqa: BLE001 - the handler's bug must not leak a slot
                    log.exception("side channel %s:%s: on_close failed", addr[0], addr[1])

    def _authenticate(self, frames: _Frames) -> _Channel:
        by = time.monotonic() + self.limits.auth_timeout_s
        nonce_s = os.urandom(NONCE_BYTES)
        frames.send(_NO_MAC, _ENCODER.encode(Challenge(PROTOCOL_VERSION, nonce_s)))
        mac, payload = frames.recv(PREAUTH_MAX_FRAME, by, self.limits.auth_timeout_s, by)
        hello = _decode(_FROM_CLIENT, payload, "decode side")
        if not isinstance(hello, Hello):
            raise UnexpectedMessage(f"expected hello, got {type(hello).__name__}")
        if hello.version != PROTOCOL_VERSION:
            raise VersionMismatch(PROTOCOL_VERSION, hello.version, "decode side")
        ch = _Channel(frames, session_key(self.token, nonce_s, hello.nonce), b"S", b"C")
        if not ch.authentic(mac, payload):
            self.auth_failures += 1
            raise AuthError("the decode side's hello failed authentication (wrong token, or a "
                            "replayed handshake)")
        ch.send(Welcome(self.limits.idle_timeout_s, self.limits.lifetime_s))
        self.sessions += 1
        return ch

    def _requests(self, ch: _Channel, session: Session, end_by: float) -> None:
        lim = self.limits
        while not self._stop:
            next_by = min(time.monotonic() + lim.idle_timeout_s, end_by)
            mac, payload = ch.frames.recv(lim.max_frame, next_by, lim.frame_timeout_s)
            if not ch.authentic(mac, payload):
                self.auth_failures += 1
                raise AuthError("a side-channel frame failed authentication (tampered, replayed "
                                "or out of order)")
            try:
                msg = _decode(_FROM_CLIENT, payload, "decode side")
                if isinstance(msg, Hello):
                    raise UnexpectedMessage("hello after the handshake")
                reply = self._dispatch(msg, session)
            except HandshakeError as e:
                reply = error_reply(e)
            ch.send(reply)

    def _dispatch(self, msg: ClientRequest, session: Session) -> Any:
        try:
            return self.handler(msg, session)
        except HandshakeError:
            raise
        except Exception as e:  # noqa: BLE001 - answered, logged here with its traceback
            log.exception("side-channel handler failed on %s", type(msg).__name__)
            return ErrorReply("internal", f"{type(e).__name__}: {e}")

    def close(self) -> None:
        self._stop = True
        for s in [self.sock, *self._open_conns()]:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        try:
            self.sock.close()
        except OSError:
            pass
        self._thread.join(timeout=2)

    def _open_conns(self) -> list[socket.socket]:
        with self._conns_lock:
            return list(self._conns)


# ------------------------------------------------------------------------------------------------
# decode side


class SideChannelClient:
    """Decode side: one authenticated connection to one prefill rank.

    `open(msg)` sends the connection's opening request (MetaRequest) and remembers it: when the
    server's idle timeout or the connection's lifetime is near, the next call reconnects and
    replays it first, and refuses to go on if a different prefill process answers."""

    def __init__(self, host: str, port: int, token: bytes, timeout: float = 30.0,
                 max_frame: int = MAX_FRAME):
        self.host, self.port = host, port
        self.token = require_token(token)
        self.timeout, self.max_frame = timeout, max_frame
        self.lock = threading.Lock()
        self._opener: Any = None
        self._opened: Any = None
        self._sock: socket.socket | None = None
        self._ch: _Channel | None = None
        self._idle_s = self._lifetime_s = 0.0
        self._last = self._born = 0.0
        self._by = 0.0
        self._connect()

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    def _connect(self) -> _Channel:
        born = time.monotonic()  # no later than the server's accept: the client's age is larger
        by = born + self.timeout
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as e:
            raise ChannelClosed(f"cannot reach the prefill side channel at {self.where}: {e}") from e
        try:
            ch = self._handshake(_Frames(sock, self.timeout), by)
        except BaseException:
            sock.close()
            raise
        self._sock, self._ch = sock, ch
        self._born, self._last = born, time.monotonic()
        return ch

    def _handshake(self, frames: _Frames, by: float) -> _Channel:
        challenge = self._read(frames, None, PREAUTH_MAX_FRAME, by)
        if not isinstance(challenge, Challenge):
            raise UnexpectedMessage(f"expected challenge, got {type(challenge).__name__}")
        if challenge.version != PROTOCOL_VERSION:
            raise VersionMismatch(PROTOCOL_VERSION, challenge.version, f"prefill at {self.where}")
        nonce_c = os.urandom(NONCE_BYTES)
        ch = _Channel(frames, session_key(self.token, challenge.nonce, nonce_c), b"C", b"S")
        ch.send(Hello(PROTOCOL_VERSION, nonce_c))
        welcome = self._read(frames, ch, PREAUTH_MAX_FRAME, by)
        if not isinstance(welcome, Welcome):
            raise UnexpectedMessage(f"expected welcome, got {type(welcome).__name__}")
        self._idle_s, self._lifetime_s = welcome.idle_timeout_s, welcome.lifetime_s
        return ch

    def _read(self, frames: _Frames, ch: _Channel | None, limit: int, by: float) -> Any:
        """The next message. A typed refusal on an authenticated connection keeps it; anything
        that leaves the stream out of step (closed, timed out, forged, malformed) drops it."""
        try:
            mac, payload = frames.recv(limit, by, self.timeout, by)
            authentic = ch is not None and ch.authentic(mac, payload)
            if not authentic and (mac != _NO_MAC or len(payload) > PREAUTH_MAX_FRAME):
                raise AuthError(f"a frame from the prefill side at {self.where} failed "
                                "authentication (wrong token, or a replayed reply)")
            msg = _decode(_FROM_SERVER, payload, f"prefill at {self.where}")
        except HandshakeError:
            self._drop()
            raise
        if authentic:
            if isinstance(msg, ErrorReply):
                raise error_from_reply(msg)
            return msg
        # unauthenticated: only the challenge, or a refusal the server closes after
        if ch is None and isinstance(msg, Challenge):
            return msg
        self._drop()
        if isinstance(msg, ErrorReply):
            raise error_from_reply(msg, authentic=False)
        raise AuthError(f"an unauthenticated {type(msg).__name__} from the prefill side at "
                        f"{self.where} (a replayed or forged frame)")

    def open(self, msg: Any) -> Any:
        """Send the connection's opening request; it is replayed after every reconnect."""
        reply = self.call(msg)
        self._opener, self._opened = msg, reply
        return reply

    def call(self, msg: Any) -> Any:
        self.start(msg)
        return self.finish()

    def start(self, msg: Any) -> None:
        """Send a request; `finish()` reads its reply (so several peers can be asked at once)."""
        self.lock.acquire()
        try:
            self._by = time.monotonic() + self.timeout
            ch = self._ch
            if ch is None or self._expiring():
                ch = self._reconnect()
            ch.send(msg)
        except BaseException as e:
            if isinstance(e, ChannelClosed | ChannelTimeout):
                self._drop()  # the next call starts a new connection
            self.lock.release()
            raise

    def finish(self) -> Any:
        try:
            if self._ch is None:
                raise ChannelClosed(f"side channel to {self.where} is closed")
            reply = self._read(self._ch.frames, self._ch, self.max_frame, self._by)
            self._last = time.monotonic()
            return reply
        finally:
            self.lock.release()

    def _expiring(self) -> bool:
        """The server would close this connection before (or while) it serves a call now."""
        now = time.monotonic()
        idle = now - self._last >= self._idle_s - min(2.0, self._idle_s / 4)
        return idle or now - self._born >= self._lifetime_s - min(5.0, self._lifetime_s / 4)

    def _reconnect(self) -> _Channel:
        self._drop()
        ch = self._connect()
        if self._opener is None:
            return ch
        try:
            ch.send(self._opener)
            reply = self._read(ch.frames, ch, self.max_frame, self._by)
        except BaseException:
            self._drop()
            raise
        if not _same_peer(self._opened, reply):
            self._drop()
            raise HandshakeError(f"a different prefill process answers at {self.where} "
                                 "(restarted?): connect again")
        return ch

    def _drop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
        self._sock, self._ch = None, None

    def close(self) -> None:
        self._drop()


def _same_peer(before: Any, after: Any) -> bool:
    keys = ("agent_name", "hash", "spec", "staging")
    return type(before) is type(after) and all(
        getattr(before, k, None) == getattr(after, k, None) for k in keys)


def compare_hash(local_factors: dict, local_hash: str, remote_factors: dict,
                 remote_hash: str) -> None:
    """Hash first; on mismatch name the factors. `local` is the decode side."""
    if local_hash != remote_hash:
        raise HashMismatch(differing_factors(local_factors, remote_factors), local_hash,
                           remote_hash)
