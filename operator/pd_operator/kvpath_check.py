"""The KV path check's shell: list the pools' pods, read the side-channel token, call the decode
server's POST /pd/v1/kv-path-check once per prefill rank (kvpath.py holds the pure parts).

`check()` is the one call a test or a person needs: a decode pod's address, a prefill side
channel's address and the token in, a kvpath.Outcome out, never an exception. `check_ranks()`
runs the plan of a pair (kvpath.plan: one check per prefill rank), one rank after the other,
within kvpath.TOTAL_TIMEOUT_S, and folds the answers (kvpath.combine).
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from typing import Any

import aiohttp

from pd_runtime.compat import ENGINE_HTTP_PORT, ResolvedPool, side_channel_ports

from . import kube, kvpath
from .api import v1alpha1 as api
from .render import labels, render
from .render import secret as side_channel
from .validate import SpecError, parse_spec, validate_spec

# Reasons of failures seen from the operator's side of the HTTP call (the decode server's own
# codes come back in its answer: kvpath.parse_answer).
DECODE_UNREACHABLE = "DecodeUnreachable"
DECODE_TIMEOUT = "DecodeTimeout"
TOKEN_UNAVAILABLE = "TokenUnavailable"


async def check(decode: str, prefill: str, token: str, *, nbytes: int = kvpath.CHECK_BYTES,
                timeout_s: float = kvpath.CHECK_TIMEOUT_S,
                call_timeout_s: float = kvpath.CALL_TIMEOUT_S) -> kvpath.Outcome:
    """Ask the decode server at `decode` (host:port of its HTTP server) to pull `nbytes` of a
    pattern from the prefill side channel at `prefill` (host:port)."""
    url = f"http://{decode}{kvpath.CHECK_PATH}"
    body = {"version": kvpath.WIRE_VERSION, "prefill": prefill, "bytes": nbytes,
            "timeout_s": timeout_s}
    try:
        async with aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=call_timeout_s)) as session, \
                session.post(url, json=body,
                             headers={"Authorization": f"Bearer {token}"}) as resp:
            raw = await resp.read()
            try:
                answer: Any = json.loads(raw)
            except ValueError:
                answer = raw.decode(errors="replace")
            return kvpath.parse_answer(resp.status, answer)
    except TimeoutError:
        return kvpath.Outcome(False, DECODE_TIMEOUT,
                              f"{url} did not answer within {call_timeout_s:.0f}s")
    except aiohttp.ClientError as exc:
        return kvpath.Outcome(False, DECODE_UNREACHABLE, f"{url}: {exc}")


async def check_ranks(checks: tuple[kvpath.RankCheck, ...], token: str, *,
                      nbytes: int = kvpath.CHECK_BYTES,
                      timeout_s: float = kvpath.CHECK_TIMEOUT_S,
                      call_timeout_s: float = kvpath.CALL_TIMEOUT_S,
                      total_timeout_s: float = kvpath.TOTAL_TIMEOUT_S) -> kvpath.Outcome:
    """Run `checks` (kvpath.plan) one after the other, stopping at the first failure; each call
    gets at most `call_timeout_s` and all of them `total_timeout_s` together (a rank whose turn
    comes after that fails as DecodeTimeout)."""
    deadline = time.monotonic() + total_timeout_s
    outcomes: list[kvpath.Outcome] = []
    for c in checks:
        left = deadline - time.monotonic()
        if left <= 0:
            out = kvpath.Outcome(False, DECODE_TIMEOUT, f"not checked: the checks of the "
                                 f"ranks before it took the whole {total_timeout_s:.0f}s")
        else:
            out = await check(c.decode, c.prefill, token, nbytes=nbytes, timeout_s=timeout_s,
                              call_timeout_s=min(call_timeout_s, left))
        outcomes.append(out)
        if not out.ok:
            break
    return kvpath.combine(outcomes, len(checks))


async def read_token(client: kube.Client, owner: labels.Owner) -> str:
    """The pool's side-channel token, from the Secret the operator created (ValueError when it
    is missing or unreadable; the value itself is never logged)."""
    name = side_channel.name(owner)
    obj = await client.get("v1", "Secret", owner.namespace, name)
    data = (obj or {}).get("data") or {}
    raw = data.get(side_channel.TOKEN_KEY)
    if not isinstance(raw, str) or not raw:
        raise ValueError(f"Secret {name} has no {side_channel.TOKEN_KEY!r} key"
                         if obj else f"Secret {name} does not exist")
    try:
        return base64.b64decode(raw, validate=True).decode().strip()
    except (binascii.Error, UnicodeDecodeError):
        raise ValueError(f"Secret {name}: the token is not base64 text") from None


async def pick_pair(client: kube.Client, owner: labels.Owner) -> kvpath.Pair | None:
    """One ready prefill pod and one ready decode pod (None while either pool has none)."""
    chosen: list[kvpath.PodRef | None] = []
    for role in ("prefill", "decode"):
        selector = ",".join(f"{k}={v}" for k, v in labels.selector_labels(owner, role).items())
        chosen.append(kvpath.choose(await client.list("v1", "Pod", owner.namespace, selector)))
    p, d = chosen
    return kvpath.Pair(p, d) if p is not None and d is not None else None


async def check_pair(client: kube.Client, owner: labels.Owner, pair: kvpath.Pair,
                     decode_port: int, side_channel_ports: tuple[int, ...]) -> kvpath.Outcome:
    """Check every prefill rank of `pair` (`side_channel_ports[r]`: rank r's side channel,
    kvpath.side_channel_ports) with the token of `owner` (a missing token is an Outcome too)."""
    checks = kvpath.plan(pair, decode_port, side_channel_ports)
    try:
        token = await read_token(client, owner)
    except (ValueError, kube.ApiError) as exc:
        return kvpath.Outcome(False, TOKEN_UNAVAILABLE, str(exc), ranks=len(checks))
    return await check_ranks(checks, token)


async def check_deployment(client: kube.Client, namespace: str, name: str
                           ) -> tuple[kvpath.Pair | None, kvpath.Outcome]:
    """The operator's check of one PDDeployment, run once from outside (`pdctl operator
    check-kv-path`): its pods now, its token, the side-channel port of every prefill rank."""
    obj = await client.get(f"{api.GROUP}/{api.VERSION}", api.KIND, namespace, name)
    if obj is None:
        return None, kvpath.Outcome(False, "NotFound", f"PDDeployment {namespace}/{name} "
                                                       "does not exist")
    owner = labels.Owner(name, namespace, obj["metadata"]["uid"])
    try:
        rendered = render(owner, validate_spec(parse_spec(dict(obj.get("spec") or {}))))
    except SpecError as exc:
        return None, kvpath.Outcome(False, "InvalidSpec", str(exc))
    if not (rendered.prefill.engine_type == rendered.decode.engine_type == "builtin"):
        return None, kvpath.Outcome(False, kvpath.UNSUPPORTED, "the KV path check needs "
                                    "engine.type builtin on both pools")
    pair = await pick_pair(client, owner)
    if pair is None:
        return None, kvpath.Outcome(False, "NoReadyPods", "a pool has no ready pod")
    return pair, await check_pair(client, owner, pair, ENGINE_HTTP_PORT,
                                  prefill_ports(rendered.prefill))


def prefill_ports(pool: ResolvedPool) -> tuple[int, ...]:
    """The side-channel port of each rank of a builtin prefill pool (rank r: base + r)."""
    return side_channel_ports(pool)
