"""Start, probe and stop processes by PID.

A process is identified by (pid, start time from /proc/<pid>/stat), so a recycled PID is never
mistaken for ours and never signalled. Processes run in their own session, so they outlive the
`pdctl` that started them and don't get the terminal's Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Proc:
    pid: int
    start_time: int  # clock ticks since boot, field 22 of /proc/<pid>/stat


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time) of a process, or None if there is none."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    rest = raw[raw.rindex(")") + 2:].split()  # fields after "pid (comm) "
    return rest[0], int(rest[19])


def alive(p: Proc) -> bool:
    st = _stat(p.pid)
    return st is not None and st[1] == p.start_time and st[0] not in ("Z", "X")


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def start(argv: list[str] | tuple[str, ...], log: Path, env: dict[str, str] | None = None) -> Proc:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as lf:
        lf.write(f"\n==== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(argv)}\n".encode())
        lf.flush()
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=lf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            env=env,
        )
    st = _stat(proc.pid)
    if st is None:  # died already
        proc.wait()
        raise RuntimeError(f"{argv[0]} exited at once (rc={proc.returncode}); see {log}")
    return Proc(proc.pid, st[1])


def stop(p: Proc, timeout: float = 10.0) -> bool:
    """SIGTERM, then SIGKILL after `timeout`. Returns True if it was ours and running."""
    if not alive(p):
        _reap(p.pid)
        return False
    os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(p.pid)
        if not alive(p):
            return True
        time.sleep(0.05)
    if alive(p):
        os.kill(p.pid, signal.SIGKILL)
        for _ in range(100):
            _reap(p.pid)
            if not alive(p):
                break
            time.sleep(0.05)
    return True


def rss_kib(p: Proc) -> int:
    """Resident memory of a process in KiB (0 if gone)."""
    try:
        for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    """Nobody listens on 127.0.0.1:port (connections lingering in TIME_WAIT don't count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def probe(
    url: str,
    ca: Path | None = None,
    cert: tuple[Path, Path] | None = None,
    timeout: float = 2.0,
) -> tuple[bool, str]:
    """GET url; (ok, short detail). HTTPS verifies against `ca` when given, else not at all
    (loopback-only components with in-memory self-signed serving certificates)."""
    ctx = None
    if url.startswith("https"):
        if ca is not None:
            ctx = ssl.create_default_context(cafile=str(ca))
        else:
            ctx = ssl._create_unverified_context()
        if cert is not None:
            ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    handler = urllib.request.ProxyHandler({})  # never via a proxy: it is all loopback
    opener = urllib.request.build_opener(handler, urllib.request.HTTPSHandler(context=ctx))
    try:
        with opener.open(url, timeout=timeout) as resp:
            body = resp.read(200).decode(errors="replace").strip()
            return resp.status == 200, body or str(resp.status)
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, str(reason)
