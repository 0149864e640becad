"""The OpenAI-compatible HTTP server over the engine (aiohttp).

    app = make_app(ServerState(role="decode", served_model_name="org/model"))
    state.engine = await AsyncEngine.start(args)     # /health says 503 "loading" until then

Endpoints: POST /v1/completions, POST /v1/chat/completions (both stream as SSE, ending with
`data: [DONE]`), GET /v1/models, GET /health, GET /metrics, and on a decode server POST
/pd/v1/kv-path-check (kvcheck.py: a known pattern pulled from a prefill engine). The P/D
protocol is vLLM's, as vllm-router drives it: a request carrying `kv_transfer_params` goes to
the engine with them, and P's answer carries the engine's `kv_transfer_params` (which the router
forwards to D unchanged).
A client that disconnects aborts its request in the engine (its KV blocks are freed).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web

from ..engine.errors import EngineError
from ..engine.tokenizer import ChatTemplateError
from . import kvcheck
from . import protocol as pr
from .metrics import CONTENT_TYPE, ServerMetrics

log = logging.getLogger("pd_runtime.serve")
_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,512}$")  # printable ASCII, as the router sends


class TokenizerLike(Protocol):
    eos_token_ids: tuple[int, ...]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
    def apply_chat_template(self, messages: list[dict],
                            add_generation_prompt: bool = True) -> str: ...


class OutputLike(Protocol):
    request_id: str
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    kv_transfer_params: dict | None


class EngineLike(Protocol):
    """What the server needs of engine.async_engine.AsyncEngine (the fake in tests has it too)."""

    tokenizer: TokenizerLike | None
    max_model_len: int

    def generate(self, request_id: str, prompt_ids: list[int], params: Any,
                 kv_transfer_params: dict | None = None) -> AsyncIterator[OutputLike]: ...
    async def abort(self, request_id: str) -> None: ...
    def stats(self) -> Mapping[str, Any]: ...


@dataclass
class ServerState:
    role: pr.Role
    served_model_name: str
    engine: EngineLike | None = None
    make_params: Callable[..., Any] | None = None  # SamplingParams constructor
    started: float = field(default_factory=time.time)
    metrics: ServerMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = ServerMetrics(lambda: self.engine.stats() if self.engine else {})


STATE = web.AppKey("state", ServerState)


def make_app(state: ServerState) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATE] = state
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    kvcheck.install(app, lambda: state.engine)
    return app


# ----------------------------------------------------------------------- small endpoints
async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.engine is None:
        return web.json_response({"status": "loading"}, status=503)
    healthy = getattr(state.engine, "healthy", None)  # AsyncEngine: False once its loop died
    if healthy is not None and not healthy():
        # 503 makes the liveness probe restart the pod instead of serving errors forever.
        return web.json_response({"status": "dead"}, status=503)
    return web.json_response({"status": "ok", "role": state.role})


async def metrics(request: web.Request) -> web.Response:
    body = request.app[STATE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    card: dict[str, Any] = {"id": state.served_model_name, "object": "model",
                            "created": int(state.started), "owned_by": "pd-runtime"}
    if state.engine is not None:
        card["max_model_len"] = state.engine.max_model_len
    return web.json_response({"object": "list", "data": [card]})


# ----------------------------------------------------------------------- request handling
def _error(status: int, message: str, *, param: str | None = None,
           code: str | None = None) -> web.Response:
    err_type = "invalid_request_error" if status < 500 else "server_error"
    return web.json_response(pr.error_body(message, err_type=err_type, param=param, code=code),
                             status=status)


@dataclass
class _Job:
    """One prompt of a request, tokenized, with what the engine needs."""

    request_id: str
    prompt_ids: list[int]
    params: Any
    kv_transfer_params: dict | None


@dataclass
class _Result:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    kv_transfer_params: dict | None = None


class _Timer:
    """TTFT and inter-token latency of one request, observed as its chunks arrive."""

    def __init__(self, m: ServerMetrics, arrival: float):
        self.m, self.arrival = m, arrival
        self.last: float | None = None

    def tokens(self, n: int) -> None:
        if n <= 0:
            return
        now = time.perf_counter()
        if self.last is None:
            self.m.ttft.observe(now - self.arrival)
        else:
            per = (now - self.last) / n
            for _ in range(n):
                self.m.itl.observe(per)
        self.last = now


def _request_id(request: web.Request) -> str:
    rid = request.headers.get("X-Request-Id", "")
    return rid if _REQUEST_ID.match(rid) else uuid.uuid4().hex


def _tokenize(state: ServerState, prompt: str | list[int], chat: bool) -> list[int]:
    if isinstance(prompt, list):
        return prompt
    tok = state.engine.tokenizer if state.engine else None
    if tok is None:
        raise pr.RequestError("this model has no tokenizer: send the prompt as token ids",
                              "messages" if chat else "prompt")
    return tok.encode(prompt, add_special_tokens=not chat)


def _sampling(state: ServerState, req: pr._Sampling, max_tokens: int | None,
              prompt_len: int) -> Any:
    assert state.engine is not None and state.make_params is not None
    room = state.engine.max_model_len - prompt_len
    if room < 1:
        raise pr.RequestError(f"the prompt has {prompt_len} tokens; this model takes at most "
                              f"{state.engine.max_model_len - 1} (max_model_len "
                              f"{state.engine.max_model_len})", "prompt", code="prompt_too_long")
    if max_tokens is None:
        max_tokens = room
    elif max_tokens > room:
        raise pr.RequestError(f"max_tokens {max_tokens} + prompt {prompt_len} tokens exceeds "
                              f"max_model_len {state.engine.max_model_len}", "max_tokens")
    if req.min_tokens > max_tokens:
        raise pr.RequestError(f"min_tokens {req.min_tokens} > max_tokens {max_tokens}",
                              "min_tokens")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return state.make_params(
        max_tokens=max_tokens, min_tokens=req.min_tokens,
        temperature=1.0 if req.temperature is None else float(req.temperature),
        top_p=1.0 if req.top_p is None else float(req.top_p),
        top_k=max(0, req.top_k or 0), seed=req.seed, stop=stop,
        stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos)


def _jobs(request: web.Request, req: pr._Sampling, prompts: Sequence[str | list[int]],
          chat: bool, max_tokens: int | None) -> list[_Job]:
    state = request.app[STATE]
    if req.model is not None and req.model != state.served_model_name:
        raise pr.RequestError(f"model {req.model!r} is not served here (this server serves "
                              f"{state.served_model_name!r})", "model", 404, "model_not_found")
    kv = pr.check_kv_transfer_params(req.kv_transfer_params, state.role, len(prompts))
    rid = _request_id(request)
    jobs = []
    for i, prompt in enumerate(prompts):
        ids = _tokenize(state, prompt, chat)
        if not ids:
            raise pr.RequestError("the prompt encodes to no tokens", "prompt")
        params = _sampling(state, req, max_tokens, len(ids))
        jobs.append(_Job(rid if len(prompts) == 1 else f"{rid}-{i}", ids, params, kv))
    return jobs


async def _run(state: ServerState, job: _Job, timer: _Timer,
               on_chunk: Callable[[OutputLike], Any] | None = None) -> _Result:
    """Drive one job to its end; abort it in the engine when we are cancelled (the client went
    away) or fail before it finished."""
    assert state.engine is not None
    res, finished = _Result(), False
    gen = state.engine.generate(job.request_id, job.prompt_ids, job.params,
                                job.kv_transfer_params)
    try:
        async for out in gen:
            timer.tokens(len(out.token_ids))
            res.text += out.text
            res.token_ids += out.token_ids
            res.prompt_tokens, res.completion_tokens = out.prompt_tokens, out.completion_tokens
            if out.kv_transfer_params is not None:
                res.kv_transfer_params = out.kv_transfer_params
            if on_chunk is not None:
                await on_chunk(out)
            if out.finished:
                finished = True
                res.finish_reason = out.finish_reason
                break
    finally:
        if not finished:
            await asyncio.shield(_abort(state, job.request_id))
        await gen.aclose()  # type: ignore[attr-defined]
    if res.finish_reason == "abort":
        raise EngineError("the engine aborted the request", code="request_aborted",
                          http_status=503)
    m = state.metrics
    m.prompt_tokens.inc(res.prompt_tokens)
    m.generation_tokens.inc(res.completion_tokens)
    m.latency.observe(time.perf_counter() - timer.arrival)
    return res


async def _abort(state: ServerState, request_id: str) -> None:
    try:
        if state.engine is not None:
            await state.engine.abort(request_id)
    except Exception:  # noqa: BLE001 - the request is gone either way; keep serving
        log.exception("abort of %s failed", request_id)


def _usage(results: Sequence[_Result]) -> dict[str, int]:
    p = sum(r.prompt_tokens for r in results)
    c = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


class _Kind:
    """What differs between /v1/completions and /v1/chat/completions."""

    def __init__(self, chat: bool):
        self.chat = chat
        self.endpoint = "/v1/chat/completions" if chat else "/v1/completions"
        self.prefix = "chatcmpl-" if chat else "cmpl-"
        self.obj = "chat.completion" if chat else "text_completion"
        self.chunk_obj = "chat.completion.chunk" if chat else "text_completion"

    def choice(self, i: int, r: _Result, job: _Job, token_ids: bool) -> dict[str, Any]:
        c: dict[str, Any] = {"index": i, "logprobs": None, "finish_reason": r.finish_reason}
        if self.chat:
            c["message"] = {"role": "assistant", "content": r.text}
        else:
            c["text"] = r.text
        if token_ids:
            c["token_ids"] = r.token_ids
            c["prompt_token_ids"] = job.prompt_ids
        return c

    def delta(self, i: int, text: str, ids: list[int], finish: str | None,
              token_ids: bool) -> dict[str, Any]:
        c: dict[str, Any] = {"index": i, "logprobs": None, "finish_reason": finish}
        if self.chat:
            c["delta"] = {"content": text} if text or finish is None else {}
        else:
            c["text"] = text
        if token_ids:
            c["token_ids"] = ids
        return c


COMPLETION, CHAT = _Kind(False), _Kind(True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _handle(request, COMPLETION)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _handle(request, CHAT)


async def _handle(request: web.Request, kind: _Kind) -> web.StreamResponse:
    state, arrival = request.app[STATE], time.perf_counter()
    m = state.metrics
    resp: web.StreamResponse
    try:
        resp = await _serve(request, kind, arrival)
    except pr.RequestError as exc:
        m.failures.labels(exc.code).inc()
        resp = _error(exc.status, exc.message, param=exc.param, code=exc.code)
    except EngineError as exc:
        m.failures.labels(exc.code).inc()
        resp = _error(exc.http_status, exc.message, code=exc.code)
    except (asyncio.CancelledError, ConnectionResetError):
        m.failures.labels("client_disconnected").inc()
        m.requests.labels(kind.endpoint, "499").inc()
        raise
    except Exception:  # noqa: BLE001 - a bug: logged with its traceback, a named 500 outside
        log.exception("%s failed", kind.endpoint)
        m.failures.labels("internal_error").inc()
        resp = _error(500, "internal error (see the server log)", code="internal_error")
    m.requests.labels(kind.endpoint, str(resp.status)).inc()
    return resp


async def _serve(request: web.Request, kind: _Kind, arrival: float) -> web.StreamResponse:
    state = request.app[STATE]
    if state.engine is None:
        raise EngineError("the model is still loading", code="loading", http_status=503)
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise pr.RequestError("the request body is not valid JSON") from None
    req: pr.CompletionRequest | pr.ChatCompletionRequest
    prompts: list[str | list[int]]
    if kind.chat:
        chat: pr.ChatCompletionRequest = pr.parse_body(pr.ChatCompletionRequest, body)
        tok = state.engine.tokenizer
        if tok is None:
            raise pr.RequestError("this model has no tokenizer (no chat template)", "messages")
        try:
            text = tok.apply_chat_template([m.as_template_input() for m in chat.messages],
                                           add_generation_prompt=chat.add_generation_prompt)
        except ChatTemplateError as exc:  # the client's messages broke the template
            raise pr.RequestError(f"chat template: {exc}", "messages") from None
        req, prompts, max_tokens = chat, [text], chat.max_completion_tokens or chat.max_tokens
    else:
        cmpl: pr.CompletionRequest = pr.parse_body(pr.CompletionRequest, body)
        req, prompts, max_tokens = cmpl, cmpl.prompts(), (cmpl.max_tokens or 16)
    jobs = _jobs(request, req, prompts, kind.chat, max_tokens)
    rid = kind.prefix + jobs[0].request_id
    if req.stream:
        return await _stream(request, kind, req, jobs, rid, arrival)
    results = await asyncio.gather(*(_run(state, j, _Timer(state.metrics, arrival))
                                     for j in jobs))
    body_out: dict[str, Any] = {
        "id": rid, "object": kind.obj, "created": int(time.time()),
        "model": state.served_model_name,
        "choices": [kind.choice(i, r, j, req.return_token_ids)
                    for i, (r, j) in enumerate(zip(results, jobs, strict=True))],
        "usage": _usage(results),
    }
    if results[0].kv_transfer_params is not None:
        body_out["kv_transfer_params"] = results[0].kv_transfer_params
    return web.json_response(body_out)


async def _stream(request: web.Request, kind: _Kind, req: pr._Sampling, jobs: list[_Job],
                  rid: str, arrival: float) -> web.StreamResponse:
    """SSE. The first chunk of every prompt is awaited before the 200 goes out, so an error the
    engine raises up front (a failed KV pull, a bad parameter) is an HTTP status, not a stream."""
    state = request.app[STATE]
    created, token_ids = int(time.time()), getattr(req, "return_token_ids", False)
    queue: asyncio.Queue[tuple[int, OutputLike | BaseException | None]] = asyncio.Queue()
    first: list[asyncio.Future[None]] = [asyncio.get_running_loop().create_future()
                                         for _ in jobs]

    async def pump(i: int, job: _Job) -> _Result:
        async def push(out: OutputLike) -> None:
            await queue.put((i, out))
            if not first[i].done():
                first[i].set_result(None)
        try:
            return await _run(state, job, _Timer(state.metrics, arrival), push)
        except BaseException as exc:
            if not first[i].done():
                first[i].set_exception(exc)
            else:
                await queue.put((i, exc))
            raise
        finally:
            await queue.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, j)) for i, j in enumerate(jobs)]
    try:
        for f in first:
            await f
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache"})
    await resp.prepare(request)
    try:
        await _write_events(resp, kind, jobs, queue, rid, created, token_ids, state)
        results = await asyncio.gather(*tasks)
        opts = req.stream_options
        if opts is not None and opts.include_usage:
            await _send(resp, {"id": rid, "object": kind.chunk_obj, "created": created,
                               "model": state.served_model_name, "choices": [],
                               "usage": _usage(results)})
    except EngineError as exc:
        state.metrics.failures.labels(exc.code).inc()
        await _send(resp, pr.error_body(exc.message, err_type="server_error", code=exc.code))
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:  # noqa: BLE001 - a bug mid-stream: the client still gets a named error
        log.exception("%s stream failed", kind.endpoint)
        state.metrics.failures.labels("internal_error").inc()
        await _send(resp, pr.error_body("internal error (see the server log)",
                                        err_type="server_error", code="internal_error"))
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def _write_events(resp: web.StreamResponse, kind: _Kind, jobs: list[_Job],
                        queue: asyncio.Queue[tuple[int, OutputLike | BaseException | None]],
                        rid: str, created: int, token_ids: bool, state: ServerState) -> None:
    base = {"id": rid, "object": kind.chunk_obj, "created": created,
            "model": state.served_model_name}
    if kind.chat:
        for i in range(len(jobs)):
            await _send(resp, {**base, "choices": [{"index": i, "logprobs": None,
                                                    "finish_reason": None, "delta": {
                                                        "role": "assistant", "content": ""}}]})
    open_jobs = len(jobs)
    while open_jobs:
        i, item = await queue.get()
        if item is None:
            open_jobs -= 1
            continue
        if isinstance(item, BaseException):
            raise item
        finish = item.finish_reason if item.finished else None
        if not item.text and not item.token_ids and finish is None:
            continue
        choice = kind.delta(i, item.text, list(item.token_ids), finish, token_ids)
        chunk = {**base, "choices": [choice]}
        if item.finished and item.kv_transfer_params is not None:
            chunk["kv_transfer_params"] = item.kv_transfer_params
        await _send(resp, chunk)


async def _send(resp: web.StreamResponse, obj: dict[str, Any]) -> None:
    await resp.write(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")
