"""The webhook's HTTPS server (aiohttp): POST /validate, POST /mutate, GET /healthz.

A thin shell over review.py: parse JSON, call the pure function, record metrics, answer. Runs in
the operator's event loop; every replica serves it (it needs no leadership).
"""

from __future__ import annotations

import json
import logging
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from .. import metrics
from . import configs, review

log = logging.getLogger(__name__)

ReviewFn = Callable[[dict[str, Any]], tuple[dict[str, Any], review.Outcome]]


def _handler(kind: str, fn: ReviewFn):
    async def handle(request: web.Request) -> web.Response:
        started = time.perf_counter()
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return web.json_response({"error": "body is not JSON"}, status=400)
        try:
            answer, outcome = fn(body)
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


def app() -> web.Application:
    application = web.Application()
    application.router.add_post(configs.VALIDATE_PATH, _handler("validate",
                                                                review.review_validate))
    application.router.add_post(configs.MUTATE_PATH, _handler("mutate", review.review_mutate))
    application.router.add_get("/healthz", _healthz)
    return application


def ssl_context(certfile: Path, keyfile: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(certfile), str(keyfile))
    return ctx


async def start(addr: str, port: int, certfile: Path, keyfile: Path) -> web.AppRunner:
    """Start serving; returns the runner (await runner.cleanup() to stop)."""
    runner = web.AppRunner(app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, addr, port, ssl_context=ssl_context(certfile, keyfile),
                       backlog=512)
    await site.start()
    log.info("webhook serving on https://%s:%d", addr, port)
    return runner
