"""The OpenAI request bodies the server accepts, and vLLM's P/D `kv_transfer_params` as
vllm-router 0.1.17 sends them (reference: vllm-known-bugs.md §4).

Every body is a typed model that forbids unknown fields: a client learns which field is wrong
(HTTP 400, OpenAI error JSON with `param`) instead of having it silently ignored. Fields the
engine does not implement are accepted only at their neutral value, so a request never gets an
answer computed with different semantics than it asked for.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

Role = Literal["prefill", "decode", "aggregated"]
NonNegInt = Annotated[StrictInt, Field(ge=0)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class RequestError(ValueError):
    """A client error: HTTP status, the offending field (OpenAI's `param`) and a message."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str = "invalid_request"):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


def error_body(message: str, *, err_type: str, param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    """OpenAI's error envelope (what the official client parses into APIError)."""
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse_body(model: type[BaseModel], body: Any) -> Any:
    """Validate a JSON body; the first problem becomes a RequestError naming its field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
        param = _loc(loc) or None
        if err["type"] == "extra_forbidden":
            msg = f"unknown field {param!r}"
        else:
            msg = f"{param}: {err['msg']}" if param else str(err["msg"])
        raise RequestError(msg, param=param) from None


# ----------------------------------------------------------------------- kv_transfer_params
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class PrefillKVParams(_Strict):
    """What vllm-router sends P (`build_prefill_kv_transfer_params`, NIXL): a request to prefill
    and hold the KV for a remote decode. Every remote_* field is null; anything else is refused
    (Mooncake / MoRI-IO shapes, or a client trying to point P somewhere)."""

    do_remote_decode: Literal[True]
    do_remote_prefill: Literal[False] = False
    remote_engine_id: None = None
    remote_block_ids: None = None
    remote_host: None = None
    remote_port: None = None


BlockId = Annotated[StrictInt, Field(ge=-1)]  # -1: a null block (outside a sliding window)
BlockIds = list[BlockId] | dict[StrictStr, list[BlockId]]


class DecodeKVParams(BaseModel):
    """What P answered and the router forwards to D unchanged (NIXL pull). The fields every
    pull needs are typed here; engine-specific extras pass through to the engine, which checks
    them against its own protocol (pd_protocol, remote_num_tokens, ...)."""

    model_config = ConfigDict(extra="allow", strict=True)

    do_remote_prefill: Literal[True]
    do_remote_decode: Literal[False] = False
    remote_engine_id: Annotated[StrictStr, Field(min_length=1, max_length=256)]
    remote_block_ids: BlockIds
    remote_host: Annotated[StrictStr, Field(min_length=1, max_length=253)]
    remote_port: Annotated[StrictInt, Field(ge=1, le=65535)]
    tp_size: Annotated[StrictInt, Field(ge=1, le=1024)]


def check_kv_transfer_params(raw: dict[str, Any] | None, role: Role,
                             num_prompts: int) -> dict[str, Any] | None:
    """The kv_transfer_params the engine gets, or RequestError. A decode server never serves a
    request without them: that would silently recompute the prompt (the router's fallback)."""
    if raw is None:
        if role == "decode":
            raise RequestError("a decode server only serves requests prefilled by a prefill "
                               "server: kv_transfer_params are required", "kv_transfer_params")
        return None
    if role == "aggregated":
        raise RequestError("this server runs --role aggregated and takes no kv_transfer_params",
                           "kv_transfer_params")
    if num_prompts != 1:  # B11: sub-requests would share one remote_block_ids
        raise RequestError("a request carrying kv_transfer_params must have exactly one prompt "
                           f"(got {num_prompts}); split batched prompts into single requests",
                           "prompt")
    model: type[BaseModel] = PrefillKVParams if role == "prefill" else DecodeKVParams
    try:
        parsed = model.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = _loc(("kv_transfer_params", *err["loc"]))
        what = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        raise RequestError(f"{param}: {what} (a {role} server accepts kv_transfer_params only "
                           "in the shape vllm-router sends)", param,
                           code="invalid_kv_transfer_params") from None
    return parsed.model_dump() if role == "prefill" else dict(raw)


# ----------------------------------------------------------------------- request bodies
class StreamOptions(_Strict):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False


class _Sampling(BaseModel):
    """The sampling fields /v1/completions and /v1/chat/completions share (OpenAI + vLLM)."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    min_tokens: NonNegInt = 0
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[NonNegInt] | None = None
    ignore_eos: StrictBool = False
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    user: StrictStr | None = None
    presence_penalty: Annotated[float, Field(ge=0.0, le=0.0)] = 0.0  # not implemented: 0 only
    frequency_penalty: Annotated[float, Field(ge=0.0, le=0.0)] = 0.0
    kv_transfer_params: dict[str, Any] | None = None
    # vllm-router 0.1.17 re-serializes every body through its own request structs, which adds
    # these at their defaults (captured from the real router); only those values are served.
    no_stop_trim: Literal[False] = False
    skip_special_tokens: Literal[True] = True
    return_hidden_states: Literal[False] = False


class CompletionRequest(_Sampling):
    prompt: (StrictStr | list[StrictStr] | list[NonNegInt] | list[list[NonNegInt]])
    echo: Literal[False] = False
    logprobs: None = None
    best_of: Literal[1] | None = None
    suffix: None = None
    return_token_ids: StrictBool = False  # vLLM extra: prompt_token_ids / token_ids in choices

    @model_validator(mode="after")
    def _non_empty(self) -> CompletionRequest:
        p = self.prompt
        if isinstance(p, list) and (not p or any(isinstance(x, list) and not x for x in p)):
            raise ValueError("prompt must not be empty")
        return self

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]
    name: StrictStr | None = None

    def as_template_input(self) -> dict[str, str]:
        text = (self.content if isinstance(self.content, str)
                else "".join(p.text for p in self.content))
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": text}


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    add_generation_prompt: StrictBool = True
    logprobs: Literal[False] | None = None
    top_logprobs: None = None
    continue_final_message: Literal[False] = False
    # router defaults again; without a reasoning parser they change nothing
    separate_reasoning: StrictBool = True
    stream_reasoning: StrictBool = True
    include_reasoning: StrictBool = True
    return_token_ids: StrictBool = False
