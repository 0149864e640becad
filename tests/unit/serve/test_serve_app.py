"""The OpenAI server over a fake engine: bodies, errors, SSE, the P/D protocol, disconnects,
metrics. The real engine and router are exercised by tests/e2e."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from pd_runtime.engine.errors import KVPullFailed
from pd_runtime.engine.sampling import SamplingParams
from pd_runtime.serve.app import ServerState, make_app
from pd_runtime.serve.metrics import parse_text
from tests.unit.serve.fake_engine import P_PARAMS, FakeEngine, d_params

pytestmark = pytest.mark.timeout(30)
MODEL = "org/tiny"


def run(role: str, body: Callable[[TestClient, FakeEngine], Awaitable[Any]],
        engine: FakeEngine | None = None, loaded: bool = True) -> Any:
    engine = engine or FakeEngine()

    async def main() -> Any:
        state = ServerState(role=role, served_model_name=MODEL,  # type: ignore[arg-type]
                            engine=engine if loaded else None, make_params=SamplingParams)
        server = TestServer(make_app(state), handler_cancellation=True)
        async with TestClient(server) as client:
            client.state = state  # type: ignore[attr-defined]
            return await body(client, engine)

    return asyncio.run(main())


async def post(c: TestClient, path: str, body: dict) -> tuple[int, dict]:
    r = await c.post(path, json=body)
    return r.status, await r.json()


def sse(raw: str) -> list[Any]:
    events = [line[len("data: "):] for line in raw.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_completion_text_usage_and_model_card():
    async def body(c: TestClient, e: FakeEngine) -> None:
        status, out = await post(c, "/v1/completions",
                                 {"model": MODEL, "prompt": "hello", "max_tokens": 5,
                                  "temperature": 0})
        assert status == 200, out
        assert out["object"] == "text_completion" and out["model"] == MODEL
        assert out["choices"][0]["text"] == e.reference("hello", 5)
        assert out["choices"][0]["finish_reason"] == "length"
        assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}
        assert "kv_transfer_params" not in out
        params = e.calls[0][2]
        assert params.max_tokens == 5 and params.temperature == 0.0
        models = await (await c.get("/v1/models")).json()
        assert models["data"][0]["id"] == MODEL and models["data"][0]["max_model_len"] == 64

    run("aggregated", body)


def test_token_id_prompts_and_return_token_ids():
    async def body(c: TestClient, e: FakeEngine) -> None:
        status, out = await post(c, "/v1/completions",
                                 {"prompt": [[1, 2], [3]], "max_tokens": 2,
                                  "return_token_ids": True})
        assert status == 200, out
        assert [ch["prompt_token_ids"] for ch in out["choices"]] == [[1, 2], [3]]
        assert [len(ch["token_ids"]) for ch in out["choices"]] == [2, 2]
        assert out["usage"]["prompt_tokens"] == 3

    run("aggregated", body)


@pytest.mark.parametrize("field,value,param", [
    ("bogus", 1, "bogus"),
    ("max_tokens", "5", "max_tokens"),
    ("max_tokens", 0, "max_tokens"),
    ("temperature", -1, "temperature"),
    ("n", 2, "n"),
    ("logprobs", 3, "logprobs"),
    ("stream", "yes", "stream"),
    ("stop", [1], "stop"),
])
def test_invalid_fields_are_400_naming_the_field(field, value, param):
    async def body(c: TestClient, e: FakeEngine) -> None:
        status, out = await post(c, "/v1/completions", {"prompt": "hi", field: value})
        assert status == 400, out
        assert out["error"]["type"] == "invalid_request_error"
        assert out["error"]["param"] is not None and out["error"]["param"].startswith(param)
        assert not e.calls

    run("aggregated", body)


def test_bad_json_wrong_model_and_loading():
    async def body(c: TestClient, e: FakeEngine) -> None:
        r = await c.post("/v1/completions", data=b"{not json",
                         headers={"Content-Type": "application/json"})
        assert r.status == 400 and "JSON" in (await r.json())["error"]["message"]
        status, out = await post(c, "/v1/completions", {"model": "other", "prompt": "x"})
        assert status == 404 and out["error"]["param"] == "model"
        status, out = await post(c, "/v1/completions",
                                 {"prompt": "x" * 60, "max_tokens": 10})
        assert status == 400 and out["error"]["param"] == "max_tokens"
        messages = [{"role": "user", "content": "hi"}]
        status, out = await post(c, "/v1/chat/completions",
                                 {"messages": messages, "max_tokens": 2, "tools": []})
        assert status == 400 and out["error"]["param"] == "tools"
        status, out = await post(c, "/v1/chat/completions",
                                 {"messages": [{"role": "robot", "content": "x"}]})
        assert status == 400 and out["error"]["param"] == "messages[0].role"

    run("aggregated", body)

    async def loading(c: TestClient, e: FakeEngine) -> None:
        r = await c.get("/health")
        assert r.status == 503 and (await r.json())["status"] == "loading"
        status, out = await post(c, "/v1/completions", {"prompt": "x"})
        assert status == 503 and out["error"]["code"] == "loading"
        c.state.engine = e  # type: ignore[attr-defined]
        assert (await c.get("/health")).status == 200
        e.healthy = lambda: False  # type: ignore[attr-defined]  # the step loop died
        r = await c.get("/health")
        assert r.status == 503 and (await r.json())["status"] == "dead"

    run("aggregated", loading, loaded=False)


def test_streaming_completion_equals_non_streaming():
    async def body(c: TestClient, e: FakeEngine) -> None:
        req = {"prompt": "abc", "max_tokens": 4, "stream": True,
               "stream_options": {"include_usage": True}}
        r = await c.post("/v1/completions", json=req)
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        chunks = sse(await r.text())
        text = "".join(ch["choices"][0]["text"] for ch in chunks if ch["choices"])
        assert text == e.reference("abc", 4)
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4

    run("aggregated", body)


def test_chat_and_chat_stream():
    async def body(c: TestClient, e: FakeEngine) -> None:
        messages = [{"role": "system", "content": "be brief"},
                    {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
        status, out = await post(c, "/v1/chat/completions",
                                 {"model": MODEL, "messages": messages,
                                  "max_completion_tokens": 3})
        assert status == 200, out
        prompt = "<system>be brief<user>hi<assistant>"
        assert out["object"] == "chat.completion"
        assert out["choices"][0]["message"] == {"role": "assistant",
                                                "content": e.reference(prompt, 3)}
        assert e.calls[0][1] == e.tokenizer.encode(prompt)
        r = await c.post("/v1/chat/completions",
                         json={"messages": messages, "max_tokens": 3, "stream": True})
        chunks = sse(await r.text())
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert chunks[0]["object"] == "chat.completion.chunk"
        text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks)
        assert text == e.reference(prompt, 3)
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"

    run("aggregated", body)


def test_prefill_leg_as_the_router_sends_it():
    """vllm-router's P leg: max_tokens 1, min_tokens 1, stream false, NIXL params."""
    async def body(c: TestClient, e: FakeEngine) -> None:
        req = {"model": MODEL, "prompt": "hello", "max_tokens": 1, "min_tokens": 1,
               "stream": False, "kv_transfer_params": dict(P_PARAMS)}
        r = await c.post("/v1/completions", json=req, headers={"X-Request-Id": "rid-1"})
        out = await r.json()
        assert r.status == 200, out
        assert e.calls[0][0] == "rid-1" and e.calls[0][3] == P_PARAMS
        assert out["kv_transfer_params"]["do_remote_prefill"] is True
        assert out["kv_transfer_params"]["remote_num_tokens"] == 5

    run("prefill", body)


def test_decode_leg_gets_p_params_unchanged_and_counts_pulls():
    async def body(c: TestClient, e: FakeEngine) -> None:
        kv = d_params()
        status, out = await post(c, "/v1/completions",
                                 {"prompt": "hello", "max_tokens": 3, "kv_transfer_params": kv})
        assert status == 200, out
        assert e.calls[0][3] == kv  # extras (pd_protocol, remote_num_tokens) pass through
        text = await (await c.get("/metrics")).text()
        m = parse_text(text)
        assert m["pd_runtime_kv_pulls_total"] == 1.0
        assert m["pd_runtime_kv_pull_bytes_total"] == 1024.0
        assert m["pd_runtime_engine_free_blocks"] == 7.0
        assert m['pd_runtime_requests_total{endpoint="/v1/completions",status="200"}'] == 1.0
        assert m["pd_runtime_generation_tokens_total"] == 3.0
        assert m["pd_runtime_time_to_first_token_seconds_count"] == 1.0
        assert m["pd_runtime_inter_token_latency_seconds_count"] == 2.0

    run("decode", body)


@pytest.mark.parametrize("role,kv,param", [
    ("prefill", {**P_PARAMS, "remote_host": "10.0.0.1"}, "kv_transfer_params.remote_host"),
    ("prefill", {**P_PARAMS, "transfer_id": "xfer-1"}, "kv_transfer_params.transfer_id"),
    ("prefill", {"do_remote_decode": "true"}, "kv_transfer_params.do_remote_decode"),
    ("prefill", d_params(), "kv_transfer_params"),
    ("decode", {k: v for k, v in d_params().items() if k != "remote_engine_id"},
     "kv_transfer_params.remote_engine_id"),
    ("decode", d_params(remote_port=70000), "kv_transfer_params.remote_port"),
    ("decode", d_params(tp_size="1"), "kv_transfer_params.tp_size"),
    ("decode", dict(P_PARAMS), "kv_transfer_params"),
    ("aggregated", dict(P_PARAMS), "kv_transfer_params"),
])
def test_malformed_kv_transfer_params_are_400(role, kv, param):
    async def body(c: TestClient, e: FakeEngine) -> None:
        status, out = await post(c, "/v1/completions",
                                 {"prompt": "hi", "max_tokens": 1, "kv_transfer_params": kv})
        assert status == 400, out
        assert out["error"]["param"].startswith(param), out
        assert not e.calls  # nothing reached the engine, nothing to leak

    run(role, body)


def test_multi_prompt_with_kv_transfer_params_is_refused_b11():
    async def body(c: TestClient, e: FakeEngine) -> None:
        status, out = await post(c, "/v1/completions",
                                 {"prompt": ["a", "b"], "kv_transfer_params": dict(P_PARAMS)})
        assert status == 400 and out["error"]["param"] == "prompt"
        assert "exactly one prompt" in out["error"]["message"]
        assert not e.calls

    run("prefill", body)


def test_decode_refuses_to_recompute_without_kv_transfer_params():
    async def body(c: TestClient, e: FakeEngine) -> None:
        status, out = await post(c, "/v1/completions", {"prompt": "hi"})
        assert status == 400 and out["error"]["param"] == "kv_transfer_params"
        assert not e.calls

    run("decode", body)


def test_engine_errors_keep_their_status_streaming_or_not():
    async def body(c: TestClient, e: FakeEngine) -> None:
        for stream in (False, True):
            status, out = await post(c, "/v1/completions",
                                     {"prompt": "hi", "stream": stream,
                                      "kv_transfer_params": d_params("dead")})
            assert status == 503, out
            assert out["error"]["code"] == "kv_pull_failed"
            assert out["error"]["type"] == "server_error"
        m = parse_text(await (await c.get("/metrics")).text())
        assert m['pd_runtime_request_failures_total{reason="kv_pull_failed"}'] == 2.0

    run("decode", body)


def test_error_from_engine_start_is_named():
    engine = FakeEngine(fail_with=KVPullFailed("lease expired", http_status=502))

    async def body(c: TestClient, e: FakeEngine) -> None:
        status, out = await post(c, "/v1/completions", {"prompt": "hi",
                                                        "kv_transfer_params": d_params()})
        assert status == 502 and out["error"]["message"] == "lease expired"

    run("decode", body, engine)


def test_client_disconnect_aborts_the_request():
    engine = FakeEngine(delay_s=0.05)

    async def body(c: TestClient, e: FakeEngine) -> None:
        r = await c.post("/v1/completions",
                         json={"prompt": "hi", "max_tokens": 50, "stream": True},
                         headers={"X-Request-Id": "gone-1"})
        assert r.status == 200
        await r.content.readuntil(b"\n\n")
        r.close()  # the client goes away mid-stream
        for _ in range(100):
            if "gone-1" in e.aborted:
                break
            await asyncio.sleep(0.02)
        assert e.aborted == ["gone-1"]
        # A non-streaming request whose client leaves is aborted too.
        task = asyncio.ensure_future(c.post("/v1/completions", json={
            "prompt": "hi", "max_tokens": 50}, headers={"X-Request-Id": "gone-2"}))
        await asyncio.sleep(0.2)
        task.cancel()
        for _ in range(100):
            if "gone-2" in e.aborted:
                break
            await asyncio.sleep(0.02)
        assert "gone-2" in e.aborted

    run("aggregated", body, engine)


def test_chat_template_errors_are_client_errors():
    from pd_runtime.engine.tokenizer import ChatTemplateError

    class Broken(FakeEngine().tokenizer.__class__):
        def apply_chat_template(self, messages, add_generation_prompt=True):
            raise ChatTemplateError("Conversation roles must alternate")

    async def body(c: TestClient, e: FakeEngine) -> None:
        status, out = await post(c, "/v1/chat/completions",
                                 {"messages": [{"role": "assistant", "content": "x"}]})
        assert status == 400 and out["error"]["param"] == "messages"
        assert "alternate" in out["error"]["message"]

    run("aggregated", body, FakeEngine(tokenizer=Broken()))


# Bodies as vllm-router 0.1.17 forwards them to P (captured from the real router with an echo
# server): it re-serializes through its request structs and adds defaults.
ROUTER_P_COMPLETION = {
    "model": MODEL, "prompt": [1, 2, 3], "max_tokens": 1, "temperature": 0.0, "stream": False,
    "echo": False, "no_stop_trim": False, "ignore_eos": True, "skip_special_tokens": True,
    "return_hidden_states": False, "return_token_ids": True, "min_tokens": 1,
    "kv_transfer_params": P_PARAMS}
ROUTER_P_CHAT = {
    "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": False,
    "max_tokens": 1, "logprobs": False, "no_stop_trim": False, "ignore_eos": False,
    "continue_final_message": False, "skip_special_tokens": True, "separate_reasoning": True,
    "stream_reasoning": True, "return_hidden_states": False, "include_reasoning": True,
    "min_tokens": 1, "kv_transfer_params": P_PARAMS}


@pytest.mark.parametrize("path,body", [("/v1/completions", ROUTER_P_COMPLETION),
                                       ("/v1/chat/completions", ROUTER_P_CHAT)])
def test_bodies_exactly_as_the_router_sends_them(path, body):
    async def run_body(c: TestClient, e: FakeEngine) -> None:
        status, out = await post(c, path, body)
        assert status == 200, out
        assert out["kv_transfer_params"]["do_remote_prefill"] is True
        status, out = await post(c, path, {**body, "skip_special_tokens": False})
        assert status == 400 and out["error"]["param"] == "skip_special_tokens"

    run("prefill", run_body)


def test_a_bug_is_a_named_500_not_a_traceback():
    class Buggy(FakeEngine):
        async def generate(self, *a, **kw):  # type: ignore[override]
            raise ZeroDivisionError("oops")
            yield  # pragma: no cover

    async def body(c: TestClient, e: FakeEngine) -> None:
        for stream in (False, True):
            status, out = await post(c, "/v1/completions", {"prompt": "hi", "stream": stream})
            assert status == 500 and out["error"]["code"] == "internal_error"
            assert "oops" not in out["error"]["message"]

    run("aggregated", body, Buggy())
