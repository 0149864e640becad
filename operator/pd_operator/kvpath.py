"""The KVPathVerified condition's pure core: which pods to check, what the answer means, what the
condition says. The shell (kvpath_check.py) lists the pods, reads the token and calls the
decode server; handlers.py runs it and writes the status.

The check itself runs in the decode pod: `POST /pd/v1/kv-path-check` (pd_runtime.serve.kvcheck)
pulls a fresh pattern from the prefill pod's side channel over NIXL into a scratch buffer and
compares it. The operator needs no exec rights, only the pool's side-channel token (the Secret
it created) as a bearer token.

Condition (builtin pools, verification on):
    pools not ready         False  WaitingForPools
    ready, not checked yet  False  Verifying
    the check passed        True   Verified   "pulled 4.0 MiB from <p-pod> to <d-pod> in 3.1 ms"
    the check failed        False  <its code> (Unreachable, PullFailed, PatternMismatch, ...)
vLLM pools: Unknown NotSupportedForEngine; `--kv-path-verification=off`: Unknown
VerificationDisabled. Neither Unknown blocks Ready.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# the decode server's endpoint (pd_runtime.serve.kvcheck; a unit test holds these equal: the
# operator imports no runtime module but pd_runtime.compat)
CHECK_PATH = "/pd/v1/kv-path-check"
WIRE_VERSION = 1
CHECK_BYTES = 4 << 20
CHECK_TIMEOUT_S = 20.0  # the decode server's bound on each step of the check
CALL_TIMEOUT_S = 60.0  # the operator's bound on the whole HTTP call

MODES = ("on", "off")
# (status, reason) of the states that are not a check's outcome
WAITING, VERIFYING, VERIFIED = "WaitingForPools", "Verifying", "Verified"
DISABLED, UNSUPPORTED = "VerificationDisabled", "NotSupportedForEngine"
NON_BLOCKING = frozenset({DISABLED, UNSUPPORTED})  # Unknown reasons that do not block Ready
QUIET = frozenset({WAITING, VERIFYING})  # reasons whose arrival is not an Event of its own

RETRY_FIRST_S = 5.0
RETRY_MAX_S = 300.0


@dataclass(frozen=True)
class PodRef:
    """A ready pod as the check needs it; `key` changes when the pod is replaced or its
    containers restart (a new engine process must be checked again)."""

    name: str
    uid: str
    ip: str
    restarts: int

    @property
    def key(self) -> tuple[str, str, str, int]:
        return self.name, self.uid, self.ip, self.restarts


@dataclass(frozen=True)
class Pair:
    prefill: PodRef
    decode: PodRef

    @property
    def key(self) -> tuple[Any, ...]:
        return self.prefill.key, self.decode.key


@dataclass(frozen=True)
class Outcome:
    """One check's answer: ok, or the named reason and the decode server's own words."""

    ok: bool
    reason: str
    message: str
    bytes: int = 0
    seconds: float = 0.0  # the whole check: connect, handshake, stage, READ, compare
    read_seconds: float = 0.0  # the NIXL READ alone


@dataclass(frozen=True)
class KVPathState:
    """What the condition is computed from. `applies`: "check" (builtin pools, verification
    on), "disabled" or "unsupported"; `outcome` belongs to `pair`, the pods last checked."""

    applies: str = "check"
    pair: Pair | None = None
    outcome: Outcome | None = None
    retry_in_s: float | None = None  # after a failure: when the next attempt runs


def ready_pod(pod: dict[str, Any]) -> PodRef | None:
    """The pod when it can be checked: Running, Ready, an IP, not being deleted."""
    meta, st = pod.get("metadata") or {}, pod.get("status") or {}
    if meta.get("deletionTimestamp") or st.get("phase") != "Running" or not st.get("podIP"):
        return None
    ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                for c in st.get("conditions") or [])
    if not ready:
        return None
    restarts = sum(int(c.get("restartCount") or 0) for c in st.get("containerStatuses") or [])
    return PodRef(meta.get("name", ""), meta.get("uid", ""), st["podIP"], restarts)


def choose(pods: list[dict[str, Any]]) -> PodRef | None:
    """One ready pod, the same one while it stays ready: the lowest name (ordinal 0 first)."""
    ready = [r for r in (ready_pod(p) for p in pods) if r is not None]
    return min(ready, key=lambda r: (len(r.name), r.name)) if ready else None


def address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def human_seconds(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def parse_answer(http_status: int, body: Any) -> Outcome:
    """The decode server's answer as an Outcome (a body of another shape is BadAnswer)."""
    if not isinstance(body, dict) or not isinstance(body.get("ok"), bool):
        return Outcome(False, "BadAnswer", f"HTTP {http_status} without a kv-path-check "
                                           f"answer: {str(body)[:200]}")
    if body["ok"] and http_status == 200:
        nbytes, secs = body.get("bytes"), body.get("seconds")
        if not isinstance(nbytes, int) or not isinstance(secs, int | float):
            return Outcome(False, "BadAnswer", "ok without bytes and seconds")
        read = body.get("read_seconds")
        return Outcome(True, VERIFIED, "", nbytes, float(secs),
                       float(read) if isinstance(read, int | float) else 0.0)
    raw = body.get("error")
    err: dict[str, Any] = raw if isinstance(raw, dict) else {}
    code = err.get("code")
    code = code if isinstance(code, str) and code else f"HTTP{http_status}"
    return Outcome(False, _reason(code), str(err.get("message") or f"HTTP {http_status}"))


def _reason(code: str) -> str:
    """A condition reason is CamelCase letters and digits (the API's pattern)."""
    cleaned = "".join(c for c in code if c.isalnum())
    return cleaned[:1].upper() + cleaned[1:] if cleaned else "Failed"


def condition(state: KVPathState, pools_ready: bool,
              previous: dict[str, Any] | None = None) -> tuple[str, str, str]:
    """(status, reason, message) of KVPathVerified (pure). `previous` is the stored condition:
    a check that re-runs on ready pools which were verified (after an operator restart) keeps
    True until it has an outcome, so a restart does not make a serving deployment flap."""
    if state.applies == "disabled":
        return ("Unknown", DISABLED, "--kv-path-verification=off (fake nodes or development "
                                     "only): the KV path between the pools was not checked")
    if state.applies == "unsupported":
        return ("Unknown", UNSUPPORTED, "the KV path check needs engine.type builtin on both "
                                        "pools (vLLM has no check endpoint)")
    if not pools_ready:
        return "False", WAITING, "waiting for the prefill and decode pools to be ready"
    pair, out = state.pair, state.outcome
    if pair is None or out is None:
        if previous and previous.get("status") == "True" and previous.get("reason") == VERIFIED:
            return "True", VERIFIED, str(previous.get("message") or "")
        return "False", VERIFYING, "checking the KV path between a prefill and a decode pod"
    route = f"from {pair.prefill.name} to {pair.decode.name}"
    if out.ok:
        read = f" (the READ: {human_seconds(out.read_seconds)})" if out.read_seconds else ""
        return ("True", VERIFIED, f"pulled {human_bytes(out.bytes)} {route} in "
                                  f"{human_seconds(out.seconds)}{read}")
    retry = "" if state.retry_in_s is None else f"; next check in {state.retry_in_s:.0f}s"
    return "False", out.reason, f"KV pull {route} failed: {out.message}{retry}"


def retry_delay(attempt: int) -> float:
    """Seconds before attempt `attempt + 1` after a failure (5 s doubling to 5 min)."""
    return min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** min(max(attempt, 0), 16))


def blocks_ready(status: str, reason: str) -> bool:
    """Whether this KVPathVerified keeps the PDDeployment from Ready."""
    return status != "True" and not (status == "Unknown" and reason in NON_BLOCKING)
