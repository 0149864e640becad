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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
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


def cpu_flags() -> set[str]:
    """This CPU's flags (/proc/cpuinfo), empty when unreadable."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(ln.split(":", 1)[1].split()) for ln in f
                         if ln.startswith("flags")), set())
    except OSError:
        return set()


def skip_unless_cpu_fp8_kv() -> None:
    """Skip a test whose engine uses an fp8 KV cache on a CPU that vLLM 0.32 refuses it on:
    CPU_ATTN raises "FP8 KV cache on CPU requires x86 with AVX-512 or AMX" at start
    (v1/attention/backends/cpu_attn.py; it asks torch for AVX-512 or AMX tiles)."""
    flags = cpu_flags()
    if "avx512f" not in flags and "amx_tile" not in flags:
        pytest.skip("vLLM 0.32 refuses an fp8 KV cache on a CPU without AVX-512 or AMX "
                    "(this one has neither)")


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


# vLLM 0.32 gives every NIXL handshake of D with a P a hard-coded 5 s receive timeout
# (nixl/base_worker.py L1043-1044: zmq RCVTIMEO 5000; no variable or kv_connector_extra_config
# key changes it). A P whose EngineCore does not answer its side channel in 5 s (CPU-starved on a
# loaded 2-core machine; seen twice in CI) fails the handshake with zmq's EAGAIN: D logs
# "handshake_setup_failed" (L1318) with the traceback ending in zmq.error.Again, and the request
# that needed the handshake fails (L1354 "handshake_failed"). vLLM does not retry it: the next
# request that needs that P starts a new handshake (L1287-1303, a failed one is not cached), and
# a successful one is reused. So the tests send a bounded number of requests until D finishes a
# handshake that did not time out, and judge that one.
HANDSHAKE_TRIES = 4
HANDSHAKE_WAIT_S = 120.0
HANDSHAKE_PASSED = "NIXL compatibility check passed"
HANDSHAKE_FAILED = "NIXL transfer failure: handshake_setup_failed"  # once per failed handshake
HASH_MISMATCH = "NIXL compatibility hash mismatch"
HANDSHAKE_TIMED_OUT = "zmq.error.Again"  # RCVTIMEO expired: no reply from P's side channel


def handshake_outcomes(log: str) -> list[str]:
    """What each handshake D finished ended in, in order: "passed", "mismatch" (the
    compatibility hashes differ), "timeout" (no reply from P in 5 s), "failed" (anything else)
    or "pending" (its traceback is not all in the log yet)."""
    lines = log.splitlines()
    out = []
    for i, line in enumerate(lines):
        if HANDSHAKE_PASSED in line:
            out.append("passed")
        elif HANDSHAKE_FAILED in line:
            kind = _failure(lines[i + 1:])
            # vLLM logs the compatibility check before it loads P's agent metadata: a failure
            # after a "passed" with nothing between ends that same handshake (one per P at a time)
            if out and out[-1] == "passed" and kind not in ("mismatch", "timeout"):
                out[-1] = kind
            else:
                out.append(kind)
    return out


def _failure(after: list[str]) -> str:
    """The kind of the failed handshake whose traceback starts at after[0]."""
    for line in after:
        if HASH_MISMATCH in line:
            return "mismatch"
        if HANDSHAKE_TIMED_OUT in line:
            return "timeout"
        if HANDSHAKE_FAILED in line or HANDSHAKE_PASSED in line \
                or "NIXL transfer failure: handshake_failed" in line:
            return "failed"  # the next record began: this traceback named neither
    return "pending"


def request_until_handshake(run: Running, send: Callable[[], Any],
                            tries: int = HANDSHAKE_TRIES,
                            wait_s: float = HANDSHAKE_WAIT_S) -> str:
    """Call `send` (one request that makes D handshake with P) until D finishes a handshake
    that did not time out, at most `tries` times; its outcome ("passed", "mismatch", "failed").
    Each try waits up to `wait_s` for D to finish the handshake it started."""
    seen: list[str] = []
    for _ in range(tries):
        before = len(handshake_outcomes(run.log("decode-0")))
        send()
        deadline = time.monotonic() + wait_s
        while True:
            seen = handshake_outcomes(run.log("decode-0"))
            new = seen[before:]
            if new and "pending" not in new:
                break
            assert time.monotonic() < deadline, \
                f"decode-0: no handshake finished in {wait_s:.0f}s (outcomes so far: {seen})"
            time.sleep(0.5)
        done = [o for o in new if o != "timeout"]
        if done:
            return done[0]
    raise AssertionError(f"decode-0: every handshake with P timed out ({tries} tries): {seen}")


def warm_up_pd(run: Running, model: str) -> None:
    """One P/D request through the router that succeeds; only a request that failed because
    D's handshake with P timed out is sent again (anything else fails the test at once)."""
    answers: list[tuple[int, Any]] = []

    def send() -> None:
        answers.append(complete(run.url, model, "warm-up", max_tokens=2))

    outcome = request_until_handshake(run, send)
    code, body = answers[-1]
    assert outcome == "passed" and code == 200, f"P/D warm-up: handshake {outcome}, " \
        f"answers {[c for c, _ in answers]}, last: {body}; {failure_lines(run)}"


def failure_lines(run: Running, n: int = 6) -> str:
    """The last error records of P and D (for a failure message: CI shows only its tail)."""
    out = []
    for name in ("prefill-0", "decode-0"):
        try:
            lines = run.log(name).splitlines()
        except OSError:
            continue
        bad = [ln.strip()[:300] for ln in lines
               if "NIXL transfer failure" in ln or " ERROR " in ln or "Error:" in ln]
        out.append(f"{name}: {bad[-n:] or 'no error lines'}")
    return " | ".join(out)


def metric_sum(base: str, name: str) -> float:
    """The sum over label sets of one Prometheus sample name at base/metrics. The same bound as
    any request to these servers: on two busy cores a vLLM API server answered nothing for over
    30 s right after failing a request (CI, 2026-12-02; its engine took 19 s to fail it)."""
    with urllib.request.urlopen(base + "/metrics", timeout=REQUEST_TIMEOUT_S) as r:  # noqa: S310
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total
