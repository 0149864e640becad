"""The webhook under abuse (issue 11, item 3): oversized, malformed, non-object, huge-list and
slow requests are refused cheaply with one log line each, while valid reviews sent at the same
time keep answering well within the API server's 5 s webhook timeout."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import socket
import ssl
import threading
import time

import aiohttp
import pytest
from op_fixtures import BASE

from pd_dev import certs
from pd_operator.webhook import review, server

FLOOD_SECONDS = 3.0
API_SERVER_TIMEOUT_S = 5.0


def _review(spec_obj, op="CREATE"):
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u", "operation": op, "object": spec_obj,
                        "name": spec_obj["metadata"]["name"]}}


def _huge_list_review() -> bytes:
    """The issue's CPU attack: ~150k invalid list items in one ~450 KB request."""
    bad = copy.deepcopy(BASE)
    bad["spec"]["prefill"]["template"] = {"env": [1] * 150_000}
    return json.dumps(_review(bad)).encode()


BAD_BODIES = [
    b"{nope", b"[1, 2, 3]", b'"a string"', b"null", b"\xff\xfe\x00", b"[" * 100_000,
    json.dumps({"request": [1]}).encode(),
    json.dumps({"request": {"operation": "CREATE", "object": [1, 2]}}).encode(),
    json.dumps({"request": {"operation": "UPDATE", "object": {"spec": {}}, "oldObject": 7}}
               ).encode(),
    _huge_list_review(),
]


class ServerThread:
    """The webhook server in its own thread and event loop, as in the operator process."""

    def __init__(self, tmp_path):
        self.files = certs.generate(tmp_path)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.runner = self.loop.run_until_complete(
            server.start("127.0.0.1", self.port, self.files.cert, self.files.key))
        self.ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.runner.cleanup())
        self.loop.close()

    def __enter__(self):
        self.thread.start()
        assert self.ready.wait(20)
        return self

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(20)


@pytest.fixture
def webhook(tmp_path, monkeypatch):
    monkeypatch.setattr(server, "READ_TIMEOUT_S", 1.0)
    with ServerThread(tmp_path) as srv:
        yield srv


def _ctx(srv):
    return ssl.create_default_context(cafile=str(srv.files.ca_cert))


async def _post(session, url, data, ctx):
    async with session.post(url, data=data, ssl=ctx,
                            headers={"Content-Type": "application/json"}) as resp:
        return resp.status, await resp.read()


def test_bad_bodies_are_400_with_one_log_line(webhook, caplog):
    caplog.set_level(logging.WARNING, logger="pd_operator.webhook.server")
    url = f"https://127.0.0.1:{webhook.port}/validate"

    async def main():
        async with aiohttp.ClientSession() as session:
            return [await _post(session, url, b, _ctx(webhook)) for b in BAD_BODIES]
    answers = asyncio.run(main())
    statuses = [s for s, _ in answers]
    assert statuses[:7] == [400] * 7, statuses
    # an object that is not a PDDeployment, or a spec too large to be one: denied, not 500
    for status, body in answers[7:]:
        assert status == 200
        resp = json.loads(body)["response"]
        assert resp["allowed"] is False and resp["status"]["code"] in (400, 422)
        assert len(body) < 10_000  # no per-item error list
    assert "more than" in json.loads(answers[-1][1])["response"]["status"]["message"]
    logged = [r for r in caplog.records if r.name == "pd_operator.webhook.server"]
    assert len(logged) == 7 and not any(r.exc_info for r in logged)


def test_body_limit_above_the_api_servers_request_limit(webhook):
    url = f"https://127.0.0.1:{webhook.port}/validate"
    big_ok = copy.deepcopy(BASE)
    big_ok["metadata"]["annotations"] = {"x": "a" * (3 * 1024 * 1024)}  # 3 MiB object

    async def main():
        async with aiohttp.ClientSession() as session:
            ok = await _post(session, url, json.dumps(_review(big_ok)).encode(), _ctx(webhook))
            too_big = await _post(session, url, b" " * (server.MAX_BODY_BYTES + 1),
                                  _ctx(webhook))
            return ok, too_big
    ok, too_big = asyncio.run(main())
    assert ok[0] == 200 and json.loads(ok[1])["response"]["allowed"] is True
    assert too_big[0] == 413


def test_slow_client_is_timed_out(webhook):
    async def main():
        reader, writer = await asyncio.open_connection("127.0.0.1", webhook.port,
                                                       ssl=_ctx(webhook))
        writer.write(b"POST /validate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{")
        await writer.drain()
        started = time.monotonic()
        head = await asyncio.wait_for(reader.read(200), 10)
        writer.close()
        return head, time.monotonic() - started
    head, waited = asyncio.run(main())
    assert head.startswith(b"HTTP/1.1 408") and waited < 5


def test_flood_of_bad_requests_does_not_starve_valid_reviews(webhook):
    url = f"https://127.0.0.1:{webhook.port}/validate"
    valid = json.dumps(_review(BASE)).encode()
    oversized = b" " * (server.MAX_BODY_BYTES + 1)

    async def attacker(session, ctx, stop, counts):
        i = 0
        while time.monotonic() < stop:
            body = (BAD_BODIES + [oversized])[i % (len(BAD_BODIES) + 1)]
            i += 1
            try:
                status, _ = await _post(session, url, body, ctx)
                counts[status] = counts.get(status, 0) + 1
            except aiohttp.ClientError:
                counts["closed"] = counts.get("closed", 0) + 1

    async def main():
        ctx = _ctx(webhook)
        stop = time.monotonic() + FLOOD_SECONDS
        counts: dict = {}
        latencies = []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            attackers = [asyncio.create_task(attacker(session, ctx, stop, counts))
                         for _ in range(8)]
            while time.monotonic() < stop:
                started = time.monotonic()
                status, body = await asyncio.wait_for(
                    _post(session, url, valid, ctx), API_SERVER_TIMEOUT_S)
                latencies.append(time.monotonic() - started)
                assert status == 200 and json.loads(body)["response"]["allowed"] is True
                await asyncio.sleep(0.05)
            await asyncio.gather(*attackers)
        return latencies, counts
    latencies, counts = asyncio.run(main())
    assert len(latencies) >= 3
    assert max(latencies) < API_SERVER_TIMEOUT_S / 2, latencies
    assert sum(v for k, v in counts.items() if k != 200) > 20, counts


def test_node_count_stops_at_the_limit():
    assert not review.too_many_nodes(BASE["spec"])
    assert review.too_many_nodes({"a": [0] * 50}, limit=10)
    assert not review.too_many_nodes([[[]]], limit=3)
