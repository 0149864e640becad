"""The webhook's HTTPS server (aiohttp): POST /validate, POST /mutate, GET /healthz.

A thin shell over review.py: parse JSON, call the pure function, record metrics, answer. Runs in
the operator's event loop; every replica serves it (it needs no leadership).

Anyone who reaches the port can send anything, so every request is bounded (issue 11):
- the body may be up to MAX_BODY_BYTES (8 MiB): kube-apiserver refuses requests over 3 MiB
  (its MaxRequestBodyBytes), and an UPDATE review carries the object and oldObject, each up
  to that size, plus the envelope; a larger body is answered 413 without being read;
- a body not sent within READ_TIMEOUT_S is answered 408, an idle keep-alive connection is
  closed after KEEPALIVE_TIMEOUT_S;
- a body that is not JSON, not an object, or not an AdmissionReview is answered 400 with one
  log line (no traceback); review.py caps the work per review (REVIEW_MAX_NODES JSON values
  per object, the problems and warnings listed).
The chart's NetworkPolicy (webhook.networkPolicy) keeps everyone else off the port.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from .. import metrics
from . import configs, review
from .namespaces import FORBIDDABLE, NamespacePolicies, NamespaceUnreadable

log = logging.getLogger(__name__)

ReviewFn = Callable[[dict[str, Any]], Awaitable[tuple[dict[str, Any], review.Outcome]]]

MAX_BODY_BYTES = 8 * 1024 * 1024
READ_TIMEOUT_S = 10.0  # the API server gives up on us after its webhook timeout (5 s here)
KEEPALIVE_TIMEOUT_S = 30.0


def _refuse(kind: str, request: web.Request, status: int, reason: str) -> web.Response:
    """One log line, one short JSON answer: bad input is the client's problem, not ours."""
    log.warning("admission %s: %d from %s: %s", kind, status, request.remote, reason)
    metrics.WEBHOOK_REFUSED.labels(kind, str(status)).inc()
    return web.json_response({"error": reason}, status=status)


async def _read_review(kind: str, request: web.Request) -> dict[str, Any] | web.Response:
    try:
        raw = await asyncio.wait_for(request.read(), READ_TIMEOUT_S)
    except web.HTTPRequestEntityTooLarge:
        return _refuse(kind, request, 413, f"body larger than {MAX_BODY_BYTES} bytes")
    except TimeoutError:
        return _refuse(kind, request, 408, f"body not received within {READ_TIMEOUT_S:.0f}s")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        return _refuse(kind, request, 400, f"body is not JSON ({type(exc).__name__})")
    if not isinstance(body, dict) or not isinstance(body.get("request"), dict):
        return _refuse(kind, request, 400, "body is not an AdmissionReview object")
    return body


def _handler(kind: str, fn: ReviewFn):
    async def handle(request: web.Request) -> web.Response:
        started = time.perf_counter()
        body = await _read_review(kind, request)
        if isinstance(body, web.Response):
            return body
        try:
            answer, outcome = await fn(body)
        except Exception:  # answer, never hang the API server: deny with the reason
            log.exception("admission %s failed", kind)
            uid = (body.get("request") or {}).get("uid", "")
            answer = review.response(body, review.Outcome(
                False, "pd-operator webhook internal error (see operator log)", code=500))
            answer["response"]["uid"] = uid
            outcome = review.Outcome(False)
        metrics.WEBHOOK_SECONDS.labels(kind).observe(time.perf_counter() - started)
        metrics.WEBHOOK_REVIEWS.labels(kind, str(outcome.allowed).lower()).inc()
        for v in outcome.verdicts:
            metrics.VERDICTS.labels(v.rule, v.severity).inc()
        return web.json_response(answer)
    return handle


async def _healthz(_: web.Request) -> web.Response:
    return web.Response(text="ok")


def _policy_of(request: dict[str, Any]) -> Any:
    """spec.validation.policy of the request's object as sent (None when absent or not a map)."""
    node: Any = request.get("object")
    for key in ("spec", "validation", "policy"):
        node = node.get(key) if isinstance(node, dict) else None
    return node


def validator(forbidden: frozenset[str] = frozenset(),
              namespaces: NamespacePolicies | None = None) -> ReviewFn:
    """The validating review: `forbidden` is the cluster-wide set of forbidden policies,
    `namespaces` adds what the request's namespace forbids by its label (None: not read)."""
    async def validate(body: dict[str, Any]) -> tuple[dict[str, Any], review.Outcome]:
        extra: frozenset[str] = frozenset()
        request = body.get("request") or {}
        if namespaces is not None and request.get("operation") in ("CREATE", "UPDATE") \
                and _policy_of(request) in FORBIDDABLE:  # Strict is never forbidden
            try:
                extra = await namespaces.forbidden(str(request.get("namespace") or ""))
            except NamespaceUnreadable as exc:  # fail closed: the admin's label may forbid it
                log.warning("admission validate: %s", exc)
                outcome = review.Outcome(False, f"pd-operator webhook: {exc}; retry shortly",
                                         code=503)
                return review.response(body, outcome), outcome
        return review.review_validate(body, forbidden, extra)
    return validate


async def _mutate(body: dict[str, Any]) -> tuple[dict[str, Any], review.Outcome]:
    return review.review_mutate(body)


def app(forbidden: frozenset[str] = frozenset(),
        namespaces: NamespacePolicies | None = None) -> web.Application:
    """`forbidden` and `namespaces`: the validation policies the administrator forbids
    (see validator)."""
    application = web.Application(client_max_size=MAX_BODY_BYTES)
    application.router.add_post(configs.VALIDATE_PATH,
                                _handler("validate", validator(forbidden, namespaces)))
    application.router.add_post(configs.MUTATE_PATH, _handler("mutate", _mutate))
    application.router.add_get("/healthz", _healthz)
    return application


def ssl_context(certfile: Path, keyfile: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(certfile), str(keyfile))
    return ctx


async def start(addr: str, port: int, certfile: Path, keyfile: Path,
                forbidden: frozenset[str] = frozenset(),
                namespaces: NamespacePolicies | None = None) -> web.AppRunner:
    """Start serving; returns the runner (await runner.cleanup() to stop)."""
    runner = web.AppRunner(app(forbidden, namespaces), access_log=None,
                           keepalive_timeout=KEEPALIVE_TIMEOUT_S)
    await runner.setup()
    site = web.TCPSite(runner, addr, port, ssl_context=ssl_context(certfile, keyfile),
                       backlog=512)
    await site.start()
    log.info("webhook serving on https://%s:%d", addr, port)
    return runner
