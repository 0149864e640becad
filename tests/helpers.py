"""What every test tier (and the operator benchmarks) share: a free port, a deadline poll, how to
start pdctl (and read, stop and post to a `pdctl run`), a small valid PDDeployment, and the
bytes a KV transfer should move (the CPU and GPU kernel tests). Import as
`from tests.helpers import ...`."""

from __future__ import annotations

import copy
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from pd_runtime.kvcache import RankSpec
    from pd_runtime.planner import Request
    from pd_runtime.template import PairTemplate

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "deploy" / "examples"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, below the kernel's ephemeral
    range (pdctl run's rule: a bind(0) port is in that range, and before the process that was
    given it binds it, any outgoing connection can take it: "Address already in use")."""
    from pd_operator.localrun import free_ports

    return free_ports(1)


def wait_for(what: str, fn: Callable[[], Any], timeout: float = 60, every: float = 0.5,
             diagnose: Callable[[], str] | None = None) -> Any:
    """Poll `fn` until it returns something truthy and return that; an exception counts as not
    yet. At the deadline fail naming `what`, the last value or error, and `diagnose()`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = fn()
        except Exception as exc:  # noqa: BLE001 - shown at the deadline
            last = exc
        if last and not isinstance(last, Exception):
            return last
        if time.monotonic() > deadline:
            extra = f" {diagnose()}" if diagnose is not None else ""
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; "
                                 f"last: {last!r}{extra}")
        time.sleep(every)


def eventually(pred: Callable[[], Any], timeout: float = 5.0, every: float = 0.02) -> bool:
    """Whether `pred` holds within `timeout` (checked once more at the end); for asserting that
    something does NOT happen within a while, too."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(every)
    return bool(pred())


def pdctl() -> str:
    """The pdctl executable: the console script beside this interpreter (the venv's), else the
    one on PATH."""
    script = Path(sys.executable).parent / "pdctl"
    if script.exists():
        return str(script)
    found = shutil.which("pdctl")
    if found is None:
        raise FileNotFoundError(f"no pdctl beside {sys.executable} or on PATH: install the "
                                "project (make venv)")
    return found


def nixl_import_error() -> str | None:
    """Why NIXL cannot be imported here (for a skip reason), or None when it can."""
    try:
        from pd_runtime.transport import import_nixl

        import_nixl()
    except Exception as e:  # noqa: BLE001 - any failure is a reason to skip
        return str(e)
    return None


@dataclass
class PdctlRun:
    """A `pdctl run` that is up: its router, its state file's contents, its workdir, process."""

    url: str  # the router
    state: dict[str, Any]
    workdir: Path
    proc: subprocess.Popen[str]

    def replica(self, name: str) -> dict[str, Any]:
        (r,) = [r for r in self.state["replicas"] if r["name"] == name]
        return r


def read_state_path(proc: subprocess.Popen[str], lines: list[str], timeout_s: float) -> str:
    """Read `pdctl run`'s stdout on a thread (kept draining for the whole run, into `lines`)
    until it prints `state: PATH`; fail with its output when it exits first or is not ready in
    `timeout_s`."""
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
        path = found.get(timeout=timeout_s)
    except queue.Empty:
        raise RuntimeError("pdctl run not ready in time:\n" + "\n".join(lines[-40:])) from None
    if not path:
        raise RuntimeError("pdctl run exited early:\n" + "\n".join(lines))
    return path


def stop_pdctl_run(proc: subprocess.Popen[str], workdir: Path, grace_s: float) -> None:
    """SIGTERM `pdctl run` (SIGKILL to its group after `grace_s`); then whatever it left (it
    should leave nothing) goes too, by the process groups recorded in WORKDIR/run.json."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    state = workdir / "run.json"
    if state.exists():
        s = json.loads(state.read_text())
        for pid in [s["router"]["pid"], *[r["pid"] for r in s["replicas"]]]:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def stop_group(proc: subprocess.Popen[Any], grace_s: float, kill_wait_s: float = 5) -> None:
    """SIGTERM the process group `proc` leads (started with start_new_session); SIGKILL it
    when `proc` has not exited after `grace_s`. Nothing when `proc` has exited already."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(kill_wait_s)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, from /proc."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(d.name))
    return out


def post_json(url: str, body: dict[str, Any], timeout: float) -> tuple[int, dict[str, Any]]:
    """POST `body` as JSON: (HTTP status, the JSON answer, or {"raw": text} when not JSON)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - local URL
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except json.JSONDecodeError:
            return exc.code, {"raw": raw.decode(errors="replace")}


LLAMA_8B: dict[str, Any] = {
    "name": "meta-llama/Llama-3.1-8B-Instruct", "family": "dense", "numKVHeads": 8,
    "headSize": 128, "numHiddenLayers": 32,
}


def sample_pdd(version: str = "0.33.0", *, name: str = "t", namespace: str | None = None,
               model: dict[str, Any] | None = None, engine: dict[str, Any] | None = None,
               prefill: dict[str, Any] | None = None, decode: dict[str, Any] | None = None,
               **spec: Any) -> dict[str, Any]:
    """A small valid PDDeployment as read from YAML: Llama-3.1-8B on vLLM `version`, both pools
    FLASH_ATTN. `engine`, `prefill` and `decode` are merged into their defaults; other keyword
    arguments are further spec keys (router=..., kvTransfer=..., validation=...)."""
    metadata: dict[str, Any] = {"name": name}
    if namespace is not None:
        metadata["namespace"] = namespace
    return {
        "apiVersion": "serving.pd-operator.dev/v1alpha1", "kind": "PDDeployment",
        "metadata": metadata,
        "spec": {
            "model": copy.deepcopy(model or LLAMA_8B),
            "engine": {"image": f"vllm/vllm-openai:v{version}", **(engine or {})},
            "prefill": {"attentionBackend": "FLASH_ATTN", **copy.deepcopy(prefill or {})},
            "decode": {"attentionBackend": "FLASH_ATTN", **copy.deepcopy(decode or {})},
            **copy.deepcopy(spec),
        },
    }


def kv_requests(p: RankSpec, d: RankSpec, tokens: int,
                rng: np.random.Generator) -> tuple[Request, Request]:
    """A P request and a D request of `tokens` tokens: every cache group of the model gets a
    block table over a random permutation of its pool (blocks, or state slots)."""
    from pd_runtime.kvcache import GROUP_STATE, groups_of, make_block_table
    from pd_runtime.planner import Request

    def req(spec: RankSpec) -> Request:
        tabs = {}
        for g in groups_of(spec.model):
            pool = spec.num_state_slots if g == GROUP_STATE else spec.num_blocks
            tabs[g] = make_block_table(spec.model, g, tokens, spec.block_size,
                                       [int(x) for x in rng.permutation(pool)])
        return Request(tokens, tabs)

    preq = req(p)
    return preq, req(d)


@dataclass
class KVPair:
    """One (P rank, D rank) pair of a planned transfer and what the planner's segments make of
    it (numpy): `want_slot`, the staging slot after the gather (the pair's bytes at offset `pad`,
    0x5A around them), and `want`, the D arena after the scatter from that slot."""

    template: PairTemplate
    nbytes: int
    p_arena: np.ndarray
    want_slot: np.ndarray
    d_arena: np.ndarray
    want: np.ndarray


def kv_pairs(p: RankSpec, d: RankSpec, preq: Request, dreq: Request,
             pad: int = 256) -> Iterator[KVPair]:
    """Every (P rank, D rank) pair of the plan, D rank by D rank, with random arenas (P rank r:
    seed 3 + r, D rank r: seed 9 + r) and the bytes expected after its gather and scatter."""
    import numpy as np

    from pd_runtime.planner import plan_d_rank
    from pd_runtime.reference import apply_segments, random_arena
    from pd_runtime.template import PairTemplate

    for dr in range(d.tp_size):
        dd = d.with_rank(dr)
        for pr, pp in plan_d_rank(p, dd, preq, dreq).peers.items():
            pa = random_arena(p.with_rank(pr), 3 + pr)
            want_slot = np.full(pp.nbytes + 2 * pad, 0x5A, np.uint8)
            apply_segments(pa, want_slot, pp.gather.shifted(dst_by=pad))
            da = random_arena(dd, 9 + dr)
            want = da.copy()
            apply_segments(want_slot[pad : pad + pp.nbytes], want, pp.scatter)
            yield KVPair(PairTemplate(p.with_rank(pr), dd), pp.nbytes, pa, want_slot, da, want)
