"""Helpers of the live tier: the live vLLM environment, specs, `pdctl run` as a subprocess,
vLLM's logs and metrics. Every wait is bounded; every process started is stopped."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.helpers import PdctlRun, pdctl, post_json, read_state_path, stop_pdctl_run

ROOT = Path(__file__).resolve().parents[2]
TINY_SPEC = Path(__file__).parent / "deployments" / "tiny-vllm.yaml"
# Two vLLM servers start in about 60 s each on an idle 2-core machine; shared cores are slower.
STARTUP_TIMEOUT_S = 480.0
REQUEST_TIMEOUT_S = 120.0
HASH_PASSED = re.compile(r"NIXL compatibility check passed \(hash: ([0-9a-f]{64})\)")
HEX64 = re.compile(r"\b[0-9a-f]{64}\b")
XFER_COUNT = "vllm:nixl_xfer_time_seconds_count"


def spec_doc(model: str, **changes: Any) -> dict[str, Any]:
    """The tiny P/D spec with spec.model.name = `model` and `changes` merged into spec."""
    doc = yaml.safe_load(TINY_SPEC.read_text())
    doc["spec"]["model"]["name"] = model
    _merge(doc["spec"], copy.deepcopy(changes))
    return doc


def _merge(into: dict[str, Any], changes: dict[str, Any]) -> None:
    for k, v in changes.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def write_spec(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def pdctl_check(spec: Path) -> dict[str, Any]:
    """`pdctl check -o json FILE`'s one result."""
    out = subprocess.run([pdctl(), "check", "-o", "json",
                          str(spec)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode in (0, 1), out.stderr
    (result,) = json.loads(out.stdout)
    return result


@dataclass
class Running(PdctlRun):
    lines: list[str] = field(default_factory=list)  # pdctl run's own output

    def log(self, name: str) -> str:
        return (self.workdir / "logs" / f"{name}.log").read_text(errors="replace")

    def logs(self, n: int = 40) -> str:
        out = ["--- pdctl run", *self.lines[-n:]]
        for log in sorted((self.workdir / "logs").glob("*.log")):
            out.append(f"--- {log.name}")
            out += log.read_text(errors="replace").splitlines()[-n:]
        return "\n".join(out)


@contextmanager
def pdctl_run(spec: Path, workdir: Path) -> Iterator[Running]:
    """`pdctl run FILE` until it prints its state file; on any failure inside the block the
    servers' last log lines are printed; SIGTERM (then SIGKILL by process group) after."""
    from pd_operator.localrun import free_ports

    argv = [pdctl(), "run", str(spec),
            "--port", str(free_ports(1)), "--workdir", str(workdir),
            "--startup-timeout", str(STARTUP_TIMEOUT_S)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=ROOT)
    lines: list[str] = []
    running: Running | None = None
    try:
        state_file = read_state_path(proc, lines, STARTUP_TIMEOUT_S + 60)
        state = json.loads(Path(state_file).read_text())
        running = Running(url=state["url"], state=state, workdir=workdir, proc=proc,
                          lines=lines)
        yield running
    except BaseException:
        print(running.logs() if running else Running("", {}, workdir, proc, lines).logs())
        raise
    finally:
        stop_pdctl_run(proc, workdir, grace_s=60)


def post(url: str, body: dict[str, Any],
         timeout: float = REQUEST_TIMEOUT_S) -> tuple[int, dict[str, Any]]:
    return post_json(url, body, timeout)


def complete(base: str, model: str, prompt: str, max_tokens: int = 12) -> tuple[int, Any]:
    """A greedy completion: (HTTP status, the text or the error body)."""
    code, body = post(base + "/v1/completions", {"model": model, "prompt": prompt,
                                                 "max_tokens": max_tokens, "temperature": 0})
    return code, body["choices"][0]["text"] if code == 200 else body


# vLLM 0.32 gives D's first NIXL handshake with a P a hard-coded 5 s receive timeout
# (nixl/base_worker.py L1044, zmq RCVTIMEO 5000). On this 2-core machine, with P, D and the
# router starting at once, that first contact can time out ("handshake_failed"), and vLLM fails
# the request (kv_load_failure_policy fail): seen once in a fresh-clone CI run. It is first-contact
# only (D caches the remote agent afterwards), so the tests open the P/D path with one warm-up
# request, retried a bounded number of times, and assert on the requests after it.
HANDSHAKE_WARMUP_TRIES = 4


def warm_up_pd(run: Running, model: str) -> None:
    """One P/D request through the router until it succeeds; only a D-side handshake timeout
    may be retried (anything else fails the test at once)."""
    for attempt in range(HANDSHAKE_WARMUP_TRIES):
        code, body = complete(run.url, model, "warm-up", max_tokens=2)
        if code == 200:
            return
        if "handshake_failed" not in run.log("decode-0") or \
                attempt == HANDSHAKE_WARMUP_TRIES - 1:
            raise AssertionError(f"P/D warm-up failed ({code}): {body}")
        time.sleep(2)


def metric_sum(base: str, name: str) -> float:
    """The sum over label sets of one Prometheus sample name at base/metrics."""
    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:  # noqa: S310
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total
