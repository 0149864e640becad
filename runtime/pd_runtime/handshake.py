"""The side channel: TCP, length-prefixed msgpack frames, every frame authenticated.

Prefill serves its metadata and answers PREPARE requests; decode connects. Unlike vLLM's ZMQ
side channel, every frame carries an HMAC-SHA256 under a shared token (from a Kubernetes Secret,
env PD_RUNTIME_TOKEN or a file), bound to a per-connection server nonce, the direction and a
sequence number, so frames cannot be forged, replayed or reflected. The compatibility hash is
compared before anything else in the metadata is used; a mismatch names the differing factors.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
import threading
from typing import Any, Callable

import msgspec

from .compat.hashing import differing_factors

MAX_FRAME = 64 << 20
NONCE = 16


class HandshakeError(RuntimeError):
    pass


class AuthError(HandshakeError):
    pass


class HashMismatch(HandshakeError):
    def __init__(self, differing: list[str], local_hash: str, remote_hash: str):
        self.differing = differing
        super().__init__(
            f"compatibility hash mismatch (local {local_hash[:12]}, prefill {remote_hash[:12]}); "
            f"differing factors: {', '.join(differing) or 'unknown'}"
        )


class PeerError(HandshakeError):
    """The prefill side answered with an error."""


def load_token(explicit: str | bytes | None = None) -> bytes:
    if explicit:
        return explicit.encode() if isinstance(explicit, str) else explicit
    if os.environ.get("PD_RUNTIME_TOKEN"):
        return os.environ["PD_RUNTIME_TOKEN"].encode()
    path = os.environ.get("PD_RUNTIME_TOKEN_FILE", "/var/run/secrets/pd-runtime/token")
    if os.path.exists(path):
        with open(path, "rb") as f:
            return f.read().strip()
    raise AuthError("no side-channel token: set PD_RUNTIME_TOKEN or PD_RUNTIME_TOKEN_FILE (from a Secret)")


def _mac(token: bytes, direction: bytes, nonce: bytes, seq: int, payload: bytes) -> bytes:
    return hmac.new(token, direction + nonce + struct.pack(">Q", seq) + payload, hashlib.sha256).digest()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise HandshakeError("side channel closed by peer")
        buf += chunk
    return bytes(buf)


class _Conn:
    def __init__(self, sock: socket.socket, token: bytes, nonce: bytes, send_dir: bytes, recv_dir: bytes):
        self.sock, self.token, self.nonce = sock, token, nonce
        self.send_dir, self.recv_dir = send_dir, recv_dir
        self.sseq = self.rseq = 0

    def send(self, obj: Any, authentic: bool = True) -> None:
        payload = msgspec.msgpack.encode(obj)
        mac = _mac(self.token, self.send_dir, self.nonce, self.sseq, payload) if authentic else bytes(32)
        self.sseq += 1
        self.sock.sendall(struct.pack(">I", len(payload)) + mac + payload)

    def recv(self) -> Any:
        (n,) = struct.unpack(">I", _recv_exact(self.sock, 4))
        if n > MAX_FRAME:
            raise HandshakeError(f"frame too large ({n} bytes)")
        mac = _recv_exact(self.sock, 32)
        payload = _recv_exact(self.sock, n)
        ok = hmac.compare_digest(mac, _mac(self.token, self.recv_dir, self.nonce, self.rseq, payload))
        self.rseq += 1
        if not ok:
            if mac == bytes(32):
                try:
                    obj = msgspec.msgpack.decode(payload)
                    if isinstance(obj, dict) and obj.get("error") == "auth":
                        raise AuthError(f"prefill rejected the side-channel token: {obj.get('message')}")
                except msgspec.DecodeError:
                    pass
            raise AuthError("side-channel frame failed authentication (wrong token?)")
        return msgspec.msgpack.decode(payload)


class SideChannelServer:
    """Prefill side. `handler(request_dict) -> reply_dict` runs per authenticated frame."""

    def __init__(self, token: bytes, handler: Callable[[dict], dict], host: str = "127.0.0.1", port: int = 0):
        self.token, self.handler = token, handler
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(64)
        self.host, self.port = self.sock.getsockname()
        self.auth_failures = 0
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                s, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._client, args=(s,), daemon=True).start()

    def _client(self, s: socket.socket) -> None:
        nonce = os.urandom(NONCE)
        conn = _Conn(s, self.token, nonce, b"S", b"C")
        try:
            s.sendall(nonce)
            while True:
                try:
                    req = conn.recv()
                except AuthError as e:
                    self.auth_failures += 1
                    conn.send({"error": "auth", "message": str(e)}, authentic=False)
                    return
                try:
                    rep = self.handler(req)
                except Exception as e:  # report, keep serving
                    rep = {"error": type(e).__name__, "message": str(e)}
                conn.send(rep)
        except (HandshakeError, OSError):
            pass
        finally:
            s.close()

    def close(self) -> None:
        self._stop = True
        try:
            self.sock.close()
        except OSError:
            pass


class SideChannelClient:
    """Decode side: one authenticated connection to one prefill rank."""

    def __init__(self, host: str, port: int, token: bytes, timeout: float = 30.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.settimeout(timeout)
        try:
            nonce = _recv_exact(self.sock, NONCE)
        except (OSError, HandshakeError) as e:
            raise HandshakeError(f"no side-channel hello from {host}:{port}: {e}") from e
        self.conn = _Conn(self.sock, token, nonce, b"C", b"S")
        self.lock = threading.Lock()

    def call(self, req: dict) -> dict:
        self.start(req)
        return self.finish()

    def start(self, req: dict) -> None:
        """Send a request; `finish()` reads its reply (so several peers can be asked at once)."""
        self.lock.acquire()
        try:
            self.conn.send(req)
        except socket.timeout as e:
            self.lock.release()
            raise HandshakeError("side channel timed out") from e
        except OSError as e:
            self.lock.release()
            raise HandshakeError(f"side channel failed: {e}") from e

    def finish(self) -> dict:
        try:
            rep = self.conn.recv()
        except socket.timeout as e:
            raise HandshakeError("side channel timed out") from e
        except OSError as e:
            raise HandshakeError(f"side channel failed: {e}") from e
        finally:
            self.lock.release()
        if isinstance(rep, dict) and "error" in rep:
            if rep["error"] == "hash":
                raise HashMismatch(rep.get("differing", []), rep.get("local_hash", ""), rep.get("remote_hash", ""))
            raise PeerError(f"prefill: {rep['error']}: {rep.get('message', '')}")
        return rep

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def compare_hash(local_factors: dict, local_hash: str, remote_factors: dict, remote_hash: str) -> None:
    """Hash first; on mismatch name the factors."""
    if local_hash != remote_hash:
        raise HashMismatch(differing_factors(local_factors, remote_factors), local_hash, remote_hash)
