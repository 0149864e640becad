"""Helpers of the e2e tier: `pdctl run` as a real subprocess, `pd-runtime generate` as the
reference, metrics of a replica. Every wait is bounded; every process started is stopped."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers import free_port, pdctl

ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENTS = Path(__file__).parent / "deployments"
STARTUP_TIMEOUT_S = 240.0
TINY_MODEL = "pd-test/tiny-llama"  # spec.model.name of deployments/tiny-*.yaml
# one prompt longer than a block (21 tokens), one shorter (3)
PROMPTS = [[5, 17, 42, 99, 3, 250, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21],
           [1, 2, 3]]
MAX_TOKENS = 12


@dataclass
class Running:
    url: str  # the router
    state: dict[str, Any]
    workdir: Path
    proc: subprocess.Popen[str]

    def replica(self, name: str) -> dict[str, Any]:
        (r,) = [r for r in self.state["replicas"] if r["name"] == name]
        return r

    def metrics(self, name: str) -> dict[str, float]:
        from pd_runtime.serve.metrics import parse_text

        with urllib.request.urlopen(self.replica(name)["url"] + "/metrics", timeout=10) as r:
            return parse_text(r.read().decode())

    def logs(self) -> str:
        out = []
        for log in sorted((self.workdir / "logs").glob("*.log")):
            out.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace")
                                                      .splitlines()[-30:]))
        return "\n".join(out)


@contextmanager
def pdctl_run(deployment: Path, model_dirs: dict[str, str], workdir: Path,
              extra: list[str] | None = None) -> Iterator[Running]:
    """`pdctl run FILE` until it prints its state file; SIGTERM (and a bounded wait) after."""
    argv = [pdctl(), "run", str(deployment),
            "--port", str(free_port()), "--workdir", str(workdir), *(extra or [])]
    for name, path in model_dirs.items():
        argv += ["--model-dir", f"{name}={path}"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=ROOT)
    lines: list[str] = []
    try:
        state_file = _wait_for_state(proc, lines)
        state = json.loads(Path(state_file).read_text())
        yield Running(url=state["url"], state=state, workdir=workdir, proc=proc)
    finally:
        _stop(proc, workdir)


def _wait_for_state(proc: subprocess.Popen[str], lines: list[str]) -> str:
    """Read pdctl's stdout on a thread (kept draining for the whole run) until `state: PATH`."""
    assert proc.stdout is not None
    found: queue.Queue[str] = queue.Queue()

    def drain() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("state: "):
                found.put(line[len("state: "):].strip())
        found.put("")

    threading.Thread(target=drain, daemon=True).start()
    try:
        path = found.get(timeout=STARTUP_TIMEOUT_S)
    except queue.Empty:
        raise RuntimeError("pdctl run not ready in time:\n" + "\n".join(lines[-40:])) from None
    if not path:
        raise RuntimeError("pdctl run exited early:\n" + "\n".join(lines))
    return path


def _stop(proc: subprocess.Popen[str], workdir: Path) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    # Whatever the runner left (it should leave nothing) goes too, by the recorded groups.
    state = workdir / "run.json"
    if state.exists():
        s = json.loads(state.read_text())
        for pid in [s["router"]["pid"], *[r["pid"] for r in s["replicas"]]]:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def wait_healthy(url: str, proc: subprocess.Popen[Any], log: Path,
                 timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} not healthy after {timeout_s}s:\n{log.read_text()[-3000:]}")


def reference(model: str, *, prompt: str | None = None, prompt_ids: list[int] | None = None,
              max_tokens: int, dtype: str = "bfloat16") -> dict[str, Any]:
    """`pd-runtime generate ... -o json`: the offline greedy reference."""
    argv = [sys.executable, "-m", "pd_runtime.cli", "generate", "--model", model,
            "--max-tokens", str(max_tokens), "--dtype", dtype, "-o", "json"]
    if prompt is not None:
        argv += ["--prompt", prompt]
    else:
        argv += ["--prompt-ids", ",".join(map(str, prompt_ids or []))]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def post(url: str, body: dict[str, Any], timeout: float = 120.0) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except json.JSONDecodeError:
            return exc.code, {"raw": raw.decode(errors="replace")}
