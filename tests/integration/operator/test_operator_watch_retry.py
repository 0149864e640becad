"""kopf's watch against an API server that is restarting (no cluster: a fake server, seconds).

A restarting kube-apiserver answers custom-resource requests with 503 "the request has been made
before all known HTTP paths have been installed" for a while. kopf retries a failed request once
per delay of `settings.networking.error_backoffs` and then raises; raised inside a watch, that
ends kopf's watcher task for good (the operator keeps running and sees no further event of that
kind). These tests drive kopf's own watch loop (`kopf._cogs.clients.watching`, private: this pins
the framework behaviour the operator relies on) with the settings the operator uses.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

import kopf
import pytest
from aiohttp import web
from kopf._cogs.clients import auth, errors, watching
from kopf._cogs.structs import credentials, references

from pd_operator import handlers, kube, leader

NOT_READY = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 503,
             "reason": "ServiceUnavailable",
             "message": "the request has been made before all known HTTP paths have been "
                        "installed, please try again"}
PDD = references.Resource("serving.pd-operator.dev", "v1alpha1", "pddeployments", namespaced=True)


class RestartingServer:
    """Answers 503 to the first `failures` requests, then a list and a watch with one event."""

    def __init__(self, failures: int):
        self.failures = failures
        self.requests = 0
        self.done = asyncio.Event()  # set by the test: end the open watch stream

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        if self.requests <= self.failures:
            return web.json_response(NOT_READY, status=503)
        if "watch" not in request.query:
            return web.json_response({"kind": "PDDeploymentList", "items": [],
                                      "metadata": {"resourceVersion": "5"}})
        resp = web.StreamResponse()
        await resp.prepare(request)
        event = {"type": "ADDED", "object": {"metadata": {
            "name": "x", "namespace": "default", "uid": "u1", "resourceVersion": "6"}}}
        await resp.write(json.dumps(event).encode() + b"\n")
        await self.done.wait()  # an open stream until the test has read the event
        return resp


async def _first_event(settings: kopf.OperatorSettings, failures: int) -> tuple[Any, int]:
    """Run kopf's watch against the fake server: (the first ADDED event or the exception that
    ended the watch, the number of requests the server saw)."""
    server = RestartingServer(failures)
    app = web.Application()
    app.router.add_get("/{tail:.*}", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    vault = credentials.Vault()
    await vault.populate({"fake": credentials.ConnectionInfo(server=f"http://127.0.0.1:{port}")})
    auth.vault_var.set(vault)
    outcome: Any = None
    try:
        async with asyncio.timeout(20):
            async for ev in watching.infinite_watch(settings=settings, resource=PDD,
                                                    namespace="default"):
                if isinstance(ev, dict) and ev.get("type") == "ADDED":
                    outcome = ev
                    break
    except errors.APIError as exc:
        outcome = exc
    finally:
        server.done.set()
        await vault.close()  # closes the aiohttp sessions kopf opened
        await runner.cleanup()
    return outcome, server.requests


def _fast(backoffs: Any) -> Any:
    return dataclasses.replace(backoffs, first=(0.01, 0.01), then=0.02)


def test_operator_watch_outlasts_a_restarting_apiserver():
    settings = kopf.OperatorSettings()
    handlers.configure(settings)
    assert isinstance(settings.networking.error_backoffs, handlers.RetryForever)
    settings.networking.error_backoffs = _fast(settings.networking.error_backoffs)
    event, requests = asyncio.run(_first_event(settings, failures=30))
    assert isinstance(event, dict), f"the watch ended with {event!r}"
    assert event["object"]["metadata"]["name"] == "x"
    assert requests > 30


def test_kopf_default_retries_end_the_watch():
    """The control: with kopf's default (nine attempts) the same answers end the watch, which
    is what left the operator blind after a slow API server restart."""
    settings = kopf.OperatorSettings()
    settings.networking.error_backoffs = [0.01] * 8
    outcome, requests = asyncio.run(_first_event(settings, failures=30))
    assert isinstance(outcome, errors.APIServerError), outcome
    assert requests == 9


def test_retry_forever_is_a_fresh_unbounded_sequence_per_request():
    backoffs = handlers.RetryForever()
    first = [d for d, _ in zip(backoffs, range(50), strict=False)]
    second = [d for d, _ in zip(backoffs, range(50), strict=False)]
    assert first == second and len(first) == 50
    assert first[:len(backoffs.first)] == list(backoffs.first)
    assert set(first[len(backoffs.first):]) == {backoffs.then}


@pytest.mark.parametrize(("status", "serving"), [
    (503, False), (500, False), (429, False), (409, True), (403, True), (404, True)])
def test_leader_keeps_the_lease_while_the_apiserver_is_not_serving(status: int, serving: bool):
    assert leader.not_serving(kube.ApiError(status, {"message": "x"})) is not serving
