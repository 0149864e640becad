"""Helpers of the e2e tier: `pdctl run` as a real subprocess, `pd-runtime generate` as the
reference, metrics of a replica. Every wait is bounded; every process started is stopped."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.helpers import (  # free_port: re-exported (test_e2e_tiny)
    PdctlRun,
    free_port,  # noqa: F401
    pdctl,
    post_json,
    read_state_path,
    stop_pdctl_run,
)

ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENTS = Path(__file__).parent / "deployments"
STARTUP_TIMEOUT_S = 240.0
TINY_MODEL = "pd-test/tiny-llama"  # spec.model.name of deployments/tiny-*.yaml
# one prompt longer than a block (21 tokens), one shorter (3)
PROMPTS = [[5, 17, 42, 99, 3, 250, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21],
           [1, 2, 3]]
MAX_TOKENS = 12


class Running(PdctlRun):
    """The e2e tier's view: a replica's metrics and the tails of the servers' logs."""

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
    from pd_operator.localrun import free_ports  # the router binds it after the engines start

    argv = [pdctl(), "run", str(deployment),
            "--port", str(free_ports(1)), "--workdir", str(workdir), *(extra or [])]
    for name, path in model_dirs.items():
        argv += ["--model-dir", f"{name}={path}"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=ROOT)
    lines: list[str] = []
    try:
        state_file = read_state_path(proc, lines, STARTUP_TIMEOUT_S)
        state = json.loads(Path(state_file).read_text())
        yield Running(url=state["url"], state=state, workdir=workdir, proc=proc)
    finally:
        stop_pdctl_run(proc, workdir, grace_s=40)


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
    return post_json(url, body, timeout)
