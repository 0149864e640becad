"""Named engine errors: what the HTTP layer turns into a status code and an OpenAI error body."""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error the engine reports to a client (never a traceback)."""

    code: str = "engine_error"
    http_status: int = 500

    def __init__(self, message: str, *, code: str | None = None, http_status: int | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if http_status is not None:
            self.http_status = http_status


class InvalidSamplingParams(EngineError):
    code, http_status = "invalid_sampling_params", 400


class PromptTooLong(EngineError):
    code, http_status = "prompt_too_long", 400


class InvalidKVTransferParams(EngineError):
    code, http_status = "invalid_kv_transfer_params", 400


class KVPullFailed(EngineError):
    """The KV could not be pulled from prefill (dead P, expired lease, transfer error)."""

    code, http_status = "kv_pull_failed", 503


class KVHoldFailed(EngineError):
    """The prefill engine could not keep a request's KV for the decode engine."""

    code, http_status = "kv_hold_failed", 503


class RequestAborted(EngineError):
    code, http_status = "request_aborted", 499


class EngineDead(EngineError):
    """The step loop stopped (a bug or a dead TP worker); every request gets this."""

    code, http_status = "engine_dead", 503


class DuplicateRequest(EngineError):
    code, http_status = "duplicate_request_id", 400
