"""The KVPathVerified condition's pure core: which pods to check, what the answer means, what the
condition says. The shell (kvpath_check.py) lists the pods, reads the token and calls the
decode server; handlers.py runs it and writes the status.

The check itself runs in the decode pod: `POST /pd/v1/kv-path-check` (pd_runtime.serve.kvcheck)
pulls a fresh pattern from one prefill side channel over NIXL into a scratch buffer and
compares it. A prefill pod runs one side channel per TP rank (rank r on the base port + r), so
the operator plans one check per prefill rank, all from the same decode pod (`plan`), runs them
one after the other and folds the answers into one Outcome (`combine`): the path is verified
only when every rank passed. The operator needs no exec rights, only the pool's side-channel
token (the Secret it created) as a bearer token.

Condition (builtin pools, verification on):
    pools not ready         False  WaitingForPools
    ready, not checked yet  False  Verifying
    every rank passed       True   Verified   "pulled 4.0 MiB from <p-pod> to <d-pod> in 3.1 ms"
                                   (TP > 1: "pulled 4.0 MiB from each of 2 ranks of <p-pod> to
                                   <d-pod> in 3.1 ms max")
    a rank failed           False  <its code> (Unreachable, PullFailed, PatternMismatch, ...);
                                   TP > 1: the message names the rank ("from rank 1 of <p-pod>")
vLLM pools: Unknown NotSupportedForEngine; `--kv-path-verification=off`: Unknown
VerificationDisabled. Neither Unknown blocks Ready.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# the decode server's endpoint (pd_runtime.serve.kvcheck; a unit test holds these equal: the
# operator imports no runtime module but pd_runtime.compat)
CHECK_PATH = "/pd/v1/kv-path-check"
WIRE_VERSION = 1
CHECK_BYTES = 4 << 20
CHECK_TIMEOUT_S = 20.0  # the decode server's bound on each step of the check
CALL_TIMEOUT_S = 60.0  # the operator's bound on one HTTP call (one rank's check)
TOTAL_TIMEOUT_S = 180.0  # the operator's bound on the checks of all ranks of a pair

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
    """One check's answer: ok, or the named reason and the decode server's own words.

    Folded over a pair's ranks (`combine`): `ranks` is how many prefill ranks the check covers;
    when ok, `bytes` is what each rank gave and the times are the slowest rank's; when not,
    `rank` is the rank that failed (None: the failure belongs to no rank, e.g. the token)."""

    ok: bool
    reason: str
    message: str
    bytes: int = 0
    seconds: float = 0.0  # the whole check: connect, handshake, stage, READ, compare
    read_seconds: float = 0.0  # the NIXL READ alone
    ranks: int = 1
    rank: int | None = None


@dataclass(frozen=True)
class RankCheck:
    """One call of the decode server's endpoint: pull from prefill rank `rank`."""

    rank: int
    decode: str  # host:port of the decode pod's HTTP server
    prefill: str  # host:port of the prefill rank's side channel


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


def plan(pair: Pair, decode_port: int, ports: Sequence[int]) -> tuple[RankCheck, ...]:
    """One check per prefill rank (`ports[r]` is rank r's side channel), all from the same
    decode pod."""
    decode = address(pair.decode.ip, decode_port)
    return tuple(RankCheck(r, decode, address(pair.prefill.ip, port))
                 for r, port in enumerate(ports))


def combine(outcomes: Sequence[Outcome], ranks: int) -> Outcome:
    """The answers of ranks 0, 1, ... (in order; the checks stop at the first failure) as one
    Outcome for `ranks` ranks: the first failure with its rank, else ok when every rank
    answered ok."""
    for r, out in enumerate(outcomes):
        if not out.ok:
            return Outcome(False, out.reason, out.message, ranks=ranks, rank=r)
    if len(outcomes) < ranks or not outcomes:
        return Outcome(False, "Incomplete", f"{len(outcomes)} of {ranks} prefill ranks "
                                            "answered", ranks=ranks, rank=len(outcomes))
    return Outcome(True, VERIFIED, "", min(o.bytes for o in outcomes),
                   max(o.seconds for o in outcomes), max(o.read_seconds for o in outcomes),
                   ranks=ranks)


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
    p, d = pair.prefill.name, pair.decode.name
    many = out.ranks > 1
    if out.ok:
        most = " max" if many else ""
        read = f" (the READ: {human_seconds(out.read_seconds)}{most})" if out.read_seconds \
            else ""
        source = f"each of {out.ranks} ranks of {p}" if many else p
        return ("True", VERIFIED, f"pulled {human_bytes(out.bytes)} from {source} to {d} in "
                                  f"{human_seconds(out.seconds)}{most}{read}")
    source = f"rank {out.rank} of {p} (TP {out.ranks})" if many and out.rank is not None else p
    retry = "" if state.retry_in_s is None else f"; next check in {state.retry_in_s:.0f}s"
    return "False", out.reason, f"KV pull from {source} to {d} failed: {out.message}{retry}"


def retry_delay(attempt: int) -> float:
    """Seconds before attempt `attempt + 1` after a failure (5 s doubling to 5 min)."""
    return min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** min(max(attempt, 0), 16))


def blocks_ready(status: str, reason: str) -> bool:
    """Whether this KVPathVerified keeps the PDDeployment from Ready."""
    return status != "True" and not (status == "Unknown" and reason in NON_BLOCKING)
