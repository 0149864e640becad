"""kopf handlers (thin): render, apply, watch the children, report status.

- PDDeployment create / update / resume: render every child (render/), server-side apply them
  (kube.Client.apply), store what was rendered, and write the status.
- Child events (StatefulSet, Deployment and every other kind rendered): update the observed
  state and the owner's status; a child deleted or edited by hand is re-applied (drift repair).
- PDDeployment deletion: nothing to do; the children carry owner references and the garbage
  collector removes them.

A failed reconcile is reported, not only logged: the status gets `Degraded=True` (reason
ApplyFailed or RenderFailed, the message naming the child and quoting the API server), the
PDDeployment gets a Warning Event for each new failure, and kopf retries after `retry_delay`
(doubling from 5 s to 5 min). Log lines name the object as namespace/name.

KVPathVerified (builtin pools): once both pools are ready, a task per PDDeployment picks a ready
prefill and decode pod and asks the decode pod to pull a pattern from each prefill rank's side
channel in turn (kvpath_check.py; off the reconcile path, bounded in time); True only when
every rank passed. A failure is retried with backoff (5 s doubling to 5 min) while the pools
stay ready. Pools that stop being ready forget the result, so a replaced pod is checked again.
`--kv-path-verification=off` skips it (fake nodes).

State kept in memory (`RUNTIME.owned`) is a cache: after a restart the resume handlers rebuild it.

Events missed while a watch was down are not lost: kopf re-lists when it reconnects (the API
server answers 410 Gone to a resourceVersion it no longer has), compares each PDDeployment's spec
with its last-handled annotation (a missed spec change runs on_pddeployment) and passes every
listed child to the child handlers. What can lose events is a watch that kopf stops for good:
see `RetryForever`.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import logging
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import kopf
from pd_runtime.compat import ENGINE_HTTP_PORT

from . import kinds, kube, kvpath, kvpath_check, metrics, render, status
from .api import v1alpha1 as api
from .render import labels
from .render import secret as side_channel
from .validate import SpecError, parse_spec, validate_spec

log = logging.getLogger(__name__)

API_VERSION = f"{api.GROUP}/{api.VERSION}"
# No handler here may need a finalizer (on.delete, timers, daemons): deletion is garbage
# collection, and a finalizer would block it (and the namespace) whenever the operator is down.

# Child kinds the operator renders and watches (pd_operator.kinds is the table):
# (group, version, plural, apiVersion, kind)
CHILD_KINDS = tuple((k.group, k.version, k.plural, k.api_version, k.kind)
                    for k in kinds.CHILD_KINDS)

# What the operator needs from RBAC (the chart's ClusterRole is exactly this, plus the rights the
# router Role it creates holds and kopf's CRD/namespace watches; tests/unit/test_chart.py).
# Each verb comes from a call the code makes; tests/unit/operator/test_op_rbac.py records the
# calls of every handler path against a fake client and derives the same verbs:
# - kopf lists and watches each resource it handles, and patches PDDeployments (its progress
#   annotations; its progress in status through the status subresource);
# - kube.Client.apply is a server-side apply: a PATCH that creates the object when absent;
# - _owner_alive reads the owner (get); _write_status merge-patches the status subresource.
# Children are never updated (PUT) or deleted by the operator: garbage collection deletes them.
CLIENT_VERBS: dict[str, tuple[str, ...]] = {
    "apply": ("create", "patch"), "create": ("create",), "get": ("get",), "list": ("list",),
    "patch_merge": ("patch",), "delete": ("delete",)}
WATCH_VERBS = ("list", "watch")
CHILD_VERBS = [*WATCH_VERBS, *CLIENT_VERBS["apply"]]
RBAC_RULES = [
    {"apiGroups": [api.GROUP], "resources": [api.PLURAL],
     "verbs": ["get", *WATCH_VERBS, "patch"]},
    {"apiGroups": [api.GROUP], "resources": [f"{api.PLURAL}/status"], "verbs": ["patch"]},
    *({"apiGroups": [g], "resources": [p], "verbs": list(CHILD_VERBS)}
      for g, _, p, _, _ in CHILD_KINDS),
    # kopf.event posts core/v1 Events (create only)
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    # the side-channel token Secret: created once; read (get) as the KV path check's bearer
    # token; never updated, listed or watched
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create", "get"]},
    # the KV path check picks a ready prefill and decode pod (their IPs)
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
     "verbs": ["get", "create", "update"]},
]


@dataclass
class Owned:
    """What the operator last rendered for one PDDeployment, and what it observed since."""

    uid: str
    generation: int | None = None
    rendered: render.Rendered | None = None
    desired_children: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    desired_replicas: dict[str, int] = field(default_factory=dict)
    observed: dict[str, dict[str, Any]] = field(default_factory=dict)  # prefill/decode/router
    last_status: dict[str, Any] | None = None
    spec_error: str | None = None
    policy: str = "Strict"  # spec.validation.policy of the last parsed spec (for Validated)
    failure: status.Failure | None = None  # the last reconcile's error, None after a success
    token_ready: bool = False  # the side-channel token Secret exists (created or found)
    kv: kvpath.KVPathState = field(default_factory=kvpath.KVPathState)  # the KV path check
    kv_task: asyncio.Task[None] | None = None  # the running check (and its retries)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Runtime:
    """Process-wide state shared by the handlers (set by the runner before kopf starts)."""

    def __init__(self) -> None:
        self.client: kube.Client | None = None
        self.owned: dict[tuple[str, str], Owned] = {}
        self.apply_concurrency = 8
        self.kv_path_verification = True  # --kv-path-verification

    def api(self) -> kube.Client:
        if self.client is None:
            raise kopf.TemporaryError("the API client is not ready", delay=1)
        return self.client


RUNTIME = Runtime()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _owner_body(namespace: str, name: str, uid: str) -> kopf.Body:
    """The PDDeployment as kopf.event needs it (the Event's involvedObject)."""
    return kopf.Body(kopf.RawBody(apiVersion=API_VERSION, kind=api.KIND, metadata={
        "name": name, "namespace": namespace, "uid": uid}))


@dataclass(frozen=True)
class RetryForever:
    """kopf's delays between the attempts of a failed API request, without an end.

    kopf retries a request that met a connection error, 5xx, 403 or 429 once per delay of
    `settings.networking.error_backoffs` and then raises. Raised inside a watch, the error ends
    kopf's watcher task for that resource, and nothing starts it again (kopf issue #1276): the
    process keeps running, keeps the lease, and never sees another event of that kind. A kube-
    apiserver that restarts answers exactly such errors for a while: connection refused, then
    503 "the request has been made before all known HTTP paths have been installed" for custom
    resources, 429 "storage is (re)initializing", 403 until its RBAC caches fill. With the
    default nine attempts (54 s of delays) a restart that takes a little longer kills the
    watch; client-go's reflectors, like this, retry for as long as it takes."""

    first: tuple[float, ...] = (1, 1, 2, 3, 5, 8, 13)
    then: float = 20.0

    def __iter__(self) -> Iterator[float]:  # a fresh sequence for every request
        return itertools.chain(self.first, itertools.repeat(self.then))


def configure(settings: kopf.OperatorSettings) -> None:
    """kopf settings for this operator (applied by the runner)."""
    settings.networking.error_backoffs = RetryForever()
    settings.peering.standalone = True  # leadership comes from our own Lease (leader.py)
    settings.posting.level = logging.WARNING  # only our own Events and real problems
    settings.watching.connect_timeout = 10
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 30
    settings.persistence.finalizer = f"{api.GROUP}/finalizer"  # no handler needs one today
    selector = "app.kubernetes.io/managed-by=" + labels.MANAGER
    for group, version, plural, _, _ in CHILD_KINDS:
        settings.watching.label_selectors[(group or "v1", plural) if not group
                                          else (group, version, plural)] = selector


# ------------------------------------------------------------------------------ reconcile
# After a failed reconcile kopf waits retry_delay(attempt) before the next one: a child the API
# server refuses (422, 403, a quota) stays refused until someone changes something, so retrying
# every 5 s forever only floods the API server and the logs.
RETRY_FIRST_S = 5.0
RETRY_MAX_S = 300.0
# How many failed children one Degraded message names (the rest are counted).
MAX_FAILURES_NAMED = 3


def retry_delay(retry: int) -> float:
    """Seconds before attempt `retry + 1` (kopf counts retries from 0)."""
    return min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** min(max(retry, 0), 16))


def describe_failures(failures: list[tuple[dict[str, Any], BaseException]]) -> str:
    """'StatefulSet demo-prefill: HTTP 422: <the API server's message>; ...' (pure)."""
    def one(child: dict[str, Any], exc: BaseException) -> str:
        what = f"{child.get('kind')} {child.get('metadata', {}).get('name')}"
        text = str(exc) if isinstance(exc, kube.ApiError) else f"{type(exc).__name__}: {exc}"
        return f"{what}: {text}"
    named = [one(c, e) for c, e in failures[:MAX_FAILURES_NAMED]]
    more = len(failures) - len(named)
    return "; ".join(named) + (f"; and {more} more" if more > 0 else "")


async def ensure_token_secret(client: kube.Client, owner: labels.Owner) -> None:
    """Create-if-absent: the token's value is chosen once; a Secret already there (409, e.g.
    after an operator restart) is kept, so running pods stay paired."""
    try:
        await client.create(side_channel.secret(owner, secrets.token_urlsafe(32)))
    except kube.ApiError as exc:
        if exc.status != 409:
            raise


async def _apply_children(client: kube.Client, children: list[dict[str, Any]], concurrency: int
                          ) -> tuple[list[dict[str, Any]], list[tuple[dict[str, Any],
                                                                      BaseException]]]:
    """Apply every child (bounded concurrency); (applied objects, [(child, error)])."""
    sem = asyncio.Semaphore(concurrency)

    async def one(obj: dict[str, Any]) -> dict[str, Any]:
        async with sem:
            return await client.apply(obj)

    # RoleBindings last: the API server checks a binding against the Role it names (RBAC
    # escalation check; the operator holds the Role's permissions, not `bind`), and answers 404
    # while that Role does not exist yet (seen with the chart's ServiceAccount on the real node).
    waves = ([c for c in children if c.get("kind") != "RoleBinding"],
             [c for c in children if c.get("kind") == "RoleBinding"])
    ordered, results = [], []
    for wave in waves:
        ordered += wave
        results += await asyncio.gather(*(one(c) for c in wave), return_exceptions=True)
    applied = [r for r in results if not isinstance(r, BaseException)]
    failed = [(c, r) for c, r in zip(ordered, results) if isinstance(r, BaseException)]
    for _, exc in failed:
        if isinstance(exc, asyncio.CancelledError):
            raise exc
    return applied, failed


async def _report_failure(client: kube.Client, namespace: str, name: str, state: Owned,
                          stored: dict[str, Any] | None, failure: status.Failure) -> None:
    """Degraded condition + Event; a status write that fails too is logged, not raised (the
    original error is the one kopf should retry on)."""
    state.failure = failure
    try:
        await _write_status(client, namespace, name, state, stored)
    except Exception as exc:  # logged here: the caller raises the cause
        log.warning("%s/%s: could not write the Degraded status: %s", namespace, name, exc)


async def reconcile(body: kopf.Body, logger: logging.Logger | kopf.Logger,
                    retry: int = 0) -> None:
    meta = body.get("metadata", {})
    name, namespace, uid = meta["name"], meta["namespace"], meta["uid"]
    key = (namespace, name)
    state = RUNTIME.owned.get(key)
    if state is None or state.uid != uid:
        state = RUNTIME.owned[key] = Owned(uid=uid)
    started = time.perf_counter()
    client = RUNTIME.api()
    async with state.lock:
        state.generation = meta.get("generation")
        try:
            spec = parse_spec(dict(body.get("spec", {})))
        except SpecError as exc:
            state.spec_error = str(exc)
            state.rendered = None
            await _write_status(client, namespace, name, state, body.get("status"))
            metrics.RECONCILES.labels("invalid").inc()
            raise kopf.PermanentError(f"invalid spec: {exc}") from None
        state.spec_error = None
        state.policy = spec.validation.policy
        try:
            rendered = render.render(labels.Owner(name, namespace, uid), validate_spec(spec),
                                     router_image=render.router_image_from(os.environ))
        except Exception as exc:  # a renderer bug: the spec was admitted but cannot be rendered
            log.exception("%s/%s: rendering the children failed", namespace, name)
            metrics.RECONCILE_ERRORS.labels("render").inc()
            await _report_failure(client, namespace, name, state, body.get("status"),
                                  status.Failure("RenderFailed", "rendering the children "
                                                 f"failed: {type(exc).__name__}: {exc}"))
            # the same spec renders the same way: wait for the next spec change (or restart)
            raise kopf.PermanentError(f"{namespace}/{name}: render failed: {exc!r}") from None
        state.rendered = rendered
        state.desired_replicas = {"prefill": spec.prefill.replicas,
                                  "decode": spec.decode.replicas,
                                  "router": spec.router.replicas}
        if not rendered.decision.accepted:
            # Admitted without the webhook (or before it existed): launch nothing.
            state.desired_children = {}
            await _write_status(client, namespace, name, state, body.get("status"))
            metrics.RECONCILES.labels("rejected").inc()
            raise kopf.PermanentError("the pools are incompatible; see status.conditions")
        state.desired_children = {render.child_key(c): c for c in rendered.children}
        token_failed: list[tuple[dict[str, Any], BaseException]] = []
        if side_channel.needed(rendered.prefill, rendered.decode) and not state.token_ready:
            owner = labels.Owner(name, namespace, uid)  # before the pods that mount it
            try:
                await ensure_token_secret(client, owner)
                state.token_ready = True
            except Exception as exc:  # reported with the children (the value is never logged)
                token_failed.append(({"kind": "Secret",
                                      "metadata": {"name": side_channel.name(owner)}}, exc))
        results, failed = await _apply_children(client, rendered.children,
                                                RUNTIME.apply_concurrency)
        failed = token_failed + failed
        for result in results:
            metrics.APPLIES.labels(result.get("kind", "unknown")).inc()
            _observe(state, result)
        if failed:
            for _, err in failed:  # network trouble, API server restarting, a refused child
                metrics.RECONCILE_ERRORS.labels(
                    str(err.status) if isinstance(err, kube.ApiError)
                    else type(err).__name__).inc()
            message = describe_failures(failed)
            await _report_failure(client, namespace, name, state, body.get("status"),
                                  status.Failure("ApplyFailed", message))
            delay = retry_delay(retry)
            raise kopf.TemporaryError(f"{namespace}/{name}: {len(failed)} of "
                                      f"{len(rendered.children)} children not applied, next "
                                      f"attempt in {delay:.0f}s: {message}", delay=delay)
        state.failure = None
        await _write_status(client, namespace, name, state, body.get("status"))
        _kick_kv_check(namespace, name, state)
    metrics.RECONCILES.labels("applied").inc()
    metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)
    logger.info("%s/%s: applied %d children", namespace, name, len(rendered.children))


def _observe(state: Owned, obj: dict[str, Any] | None, deleted: bool = False) -> None:
    if not obj:
        return
    kind = obj.get("kind")
    role = (obj.get("metadata", {}).get("labels") or {}).get(labels.ROLE_LABEL)
    if (kind == "StatefulSet" and role in ("prefill", "decode")) or \
            (kind == "Deployment" and role == "router"):
        if deleted:
            state.observed.pop(role, None)
        else:
            state.observed[role] = obj


async def _write_status(client: kube.Client, namespace: str, name: str, state: Owned,
                        stored: dict[str, Any] | None) -> None:
    previous = state.last_status if state.last_status is not None else dict(stored or {})
    decision = state.rendered.decision if state.rendered else None
    new, transitions = status.compute(
        generation=state.generation,
        desired=state.desired_replicas or {"prefill": 0, "decode": 0, "router": 0},
        decision=decision,
        observed=status.Observed(state.observed.get("prefill"), state.observed.get("decode"),
                                 state.observed.get("router")),
        previous=previous, now=_now(), spec_error=state.spec_error, failure=state.failure,
        policy=state.policy, kv_path=_kv_path(state))
    if status.same(new, previous):
        if previous:  # the stored status is current: later writes compare with it (after a
            state.last_status = previous  # restart, not with nothing: no spurious Events)
        return
    try:
        await client.patch_merge(API_VERSION, api.KIND, namespace, name, {"status": new},
                                 subresource="status")
    except kube.ApiError as exc:
        if exc.status == 404:
            return
        raise
    state.last_status = new
    owner = _owner_body(namespace, name, state.uid)
    for t in transitions:
        try:
            reason = t.reason if t.type == "Degraded" and t.warning else \
                f"{t.type}{'' if t.status == 'True' else 'False'}"
            message = f"{t.reason}: {t.message}" if t.type == "KVPathVerified" and t.warning \
                else t.message
            kopf.event(owner, type="Warning" if t.warning else "Normal", reason=reason,
                       message=status.truncate(message))
        except LookupError:  # outside a handler's context: log instead
            log.info("%s/%s: %s=%s (%s)", namespace, name, t.type, t.status, t.message)


@kopf.on.resume(api.GROUP, api.VERSION, api.PLURAL)
@kopf.on.create(api.GROUP, api.VERSION, api.PLURAL)
@kopf.on.update(api.GROUP, api.VERSION, api.PLURAL, field="spec")
async def on_pddeployment(body: kopf.Body, logger: kopf.Logger, retry: int = 0,
                          **_: Any) -> None:
    await reconcile(body, logger, retry)


@kopf.on.event(api.GROUP, api.VERSION, api.PLURAL)
async def on_pddeployment_event(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
    if event.get("type") == "DELETED":
        meta = body.get("metadata", {})
        gone = RUNTIME.owned.pop((meta.get("namespace"), meta.get("name")), None)
        if gone is not None and gone.kv_task is not None:
            gone.kv_task.cancel()


# --------------------------------------------------------------------------- child events
def _owner_of(meta: dict[str, Any]) -> tuple[str, str] | None:
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == api.KIND and ref.get("apiVersion", "").startswith(api.GROUP):
            return ref["name"], ref["uid"]
    return None


def contains(desired: Any, live: Any) -> bool:
    """True when every field of `desired` is present with the same value in `live` (lists
    element by element): what server-side apply would not change."""
    if isinstance(desired, dict):
        return isinstance(live, dict) and all(k in live and contains(v, live[k])
                                              for k, v in desired.items())
    if isinstance(desired, list):
        return isinstance(live, list) and len(desired) == len(live) and \
            all(contains(a, b) for a, b in zip(desired, live))
    return desired == live


def drifted(desired: dict[str, Any], live: dict[str, Any]) -> bool:
    for section in ("spec", "data", "rules", "roleRef", "subjects"):
        if section in desired and not contains(desired[section], live.get(section)):
            return True
    meta_d, meta_l = desired["metadata"], live.get("metadata", {})
    return not contains(meta_d.get("labels", {}), meta_l.get("labels") or {})


async def _child_event(api_version: str, kind: str, event: kopf.RawEvent,
                       logger: kopf.Logger) -> None:
    obj: dict[str, Any] = dict(event.get("object") or {})
    obj.setdefault("apiVersion", api_version)
    obj.setdefault("kind", kind)
    meta: dict[str, Any] = obj.get("metadata") or {}
    owner = _owner_of(meta)
    namespace, name = meta.get("namespace"), meta.get("name")
    if owner is None or not isinstance(namespace, str) or not isinstance(name, str):
        return  # not ours, or not a namespaced object
    state = RUNTIME.owned.get((namespace, owner[0]))
    if state is None or state.uid != owner[1]:
        return  # not reconciled yet in this process (resume will do it) or a stale owner
    etype = event.get("type") or "ADDED"
    client = RUNTIME.api()
    key = (api_version, kind, name)
    desired = state.desired_children.get(key)
    if etype == "DELETED":
        _observe(state, obj, deleted=True)
        if desired is not None and await _owner_alive(client, namespace, owner):
            logger.info("%s/%s: %s %s was deleted; re-creating it", namespace, owner[0], kind,
                        name)
            metrics.DRIFT_REPAIRS.labels(kind).inc()
            await _repair(client, state, namespace, owner[0], desired)
    else:
        _observe(state, obj)
        if desired is not None and not meta.get("deletionTimestamp") and drifted(desired, obj):
            logger.info("%s/%s: %s %s differs from what was rendered; re-applying", namespace,
                        owner[0], kind, name)
            metrics.DRIFT_REPAIRS.labels(kind).inc()
            await _repair(client, state, namespace, owner[0], desired)
    if kind in ("StatefulSet", "Deployment"):
        async with state.lock:
            if RUNTIME.owned.get((namespace, owner[0])) is state:
                await _write_status(client, namespace, owner[0], state, None)
                _kick_kv_check(namespace, owner[0], state)


async def _repair(client: kube.Client, state: Owned, namespace: str, owner_name: str,
                  desired: dict[str, Any]) -> None:
    """Re-apply one child; a refusal is reported on the owner (Degraded + Event) and raised."""
    try:
        _observe(state, await client.apply(desired))
    except kube.ApiError as exc:
        async with state.lock:
            await _report_failure(client, namespace, owner_name, state, None, status.Failure(
                "ApplyFailed", describe_failures([(desired, exc)])))
        raise


async def _owner_alive(client: kube.Client, namespace: str, owner: tuple[str, str]) -> bool:
    obj = await client.get(API_VERSION, api.KIND, namespace, owner[0])
    if not obj:
        return False
    meta = obj.get("metadata", {})
    return meta.get("uid") == owner[1] and not meta.get("deletionTimestamp")


def _register_child_handlers() -> None:
    for group, version, plural, api_version, kind in CHILD_KINDS:
        async def handler(event: kopf.RawEvent, logger: kopf.Logger, _av: str = api_version,
                          _kind: str = kind, **_: Any) -> None:
            try:
                await _child_event(_av, _kind, event, logger)
            except kube.ApiError as exc:
                meta = (event.get("object") or {}).get("metadata") or {}
                logger.warning("%s/%s: %s event: re-applying failed: %s", meta.get("namespace"),
                               meta.get("name"), _kind, exc)
                metrics.RECONCILE_ERRORS.labels(str(exc.status)).inc()
        kopf.on.event(group or "", version, plural, id=f"child-{plural}",
                      labels={"app.kubernetes.io/managed-by": labels.MANAGER})(handler)


_register_child_handlers()


# ------------------------------------------------------------------------- KV path check
def _kv_applies(state: Owned) -> str:
    """"check", "disabled" (--kv-path-verification=off) or "unsupported" (not builtin pools)."""
    r = state.rendered
    if r is not None and not (r.prefill.engine_type == "builtin"
                              and r.decode.engine_type == "builtin"):
        return "unsupported"
    return "check" if RUNTIME.kv_path_verification else "disabled"


def _kv_path(state: Owned) -> kvpath.KVPathState:
    return kvpath.KVPathState(_kv_applies(state), state.kv.pair, state.kv.outcome,
                              state.kv.retry_in_s)


def _pools_ready(state: Owned) -> bool:
    observed = status.Observed(state.observed.get("prefill"), state.observed.get("decode"),
                               state.observed.get("router"))
    return bool(state.desired_replicas) and status.pools_ready(observed, state.desired_replicas)


def _kick_kv_check(namespace: str, name: str, state: Owned) -> None:
    """Start the KV path check when the pools are ready and none runs; forget the last result
    when they are not (a pod that comes back is checked again). Called under state.lock."""
    task = state.kv_task
    running = task is not None and not task.done()
    if _kv_applies(state) != "check" or not _pools_ready(state):
        if running and task is not None:
            task.cancel()
        state.kv = kvpath.KVPathState()
        return
    if not running:
        state.kv_task = asyncio.create_task(_verify_kv_path(namespace, name, state),
                                            name=f"kv-path-check {namespace}/{name}")


def _current(namespace: str, name: str, state: Owned) -> bool:
    return RUNTIME.owned.get((namespace, name)) is state and _pools_ready(state) and \
        _kv_applies(state) == "check"


async def _verify_kv_path(namespace: str, name: str, state: Owned) -> None:
    """Check the current pair until it passes (backoff between failures); ends when it passed,
    or the pools are no longer ready, or the PDDeployment is gone."""
    client = RUNTIME.api()
    owner = labels.Owner(name, namespace, state.uid)
    attempt = 0
    while True:
        try:
            outcome = await _check_once(client, owner, state, attempt)
        except Exception as exc:  # an API error listing pods or writing status: retried
            log.warning("%s/%s: KV path check: %s", namespace, name, exc)
            outcome = kvpath.Outcome(False, "CheckFailed", str(exc))
        if outcome is None or outcome.ok:
            return
        await asyncio.sleep(kvpath.retry_delay(attempt))
        attempt += 1


async def _check_once(client: kube.Client, owner: labels.Owner, state: Owned,
                      attempt: int) -> kvpath.Outcome | None:
    """One attempt; None when there is nothing (more) to do."""
    namespace, name = owner.namespace, owner.name
    pair = await kvpath_check.pick_pair(client, owner)
    async with state.lock:
        if not _current(namespace, name, state) or state.rendered is None:
            return None
        if pair is None:  # the StatefulSets count a pod ready that the pod list does not yet
            return kvpath.Outcome(False, "NoReadyPods", "no ready pod in a pool")
        known = state.kv
        if known.pair is not None and known.pair.key == pair.key and known.outcome is not None \
                and known.outcome.ok:
            return None  # this pair was verified
        if known.pair is None or known.pair.key != pair.key:
            state.kv = kvpath.KVPathState(pair=pair)  # Verifying
            await _write_status(client, namespace, name, state, None)
        ports = kvpath_check.prefill_ports(state.rendered.prefill)
    outcome = await kvpath_check.check_pair(client, owner, pair, ENGINE_HTTP_PORT, ports)
    async with state.lock:
        if not _current(namespace, name, state) or state.kv.pair != pair:
            return None
        retry = None if outcome.ok else kvpath.retry_delay(attempt)
        state.kv = kvpath.KVPathState(pair=pair, outcome=outcome, retry_in_s=retry)
        await _write_status(client, namespace, name, state, None)
    metrics.KV_PATH_CHECKS.labels(outcome.reason).inc()
    if outcome.ok:
        metrics.KV_PATH_SECONDS.observe(outcome.seconds)
    log.log(logging.INFO if outcome.ok else logging.WARNING, "%s/%s: KV path %s -> %s: %s %s",
            namespace, name, pair.prefill.name, pair.decode.name, outcome.reason,
            outcome.message)
    return outcome
