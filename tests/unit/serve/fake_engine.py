"""A small engine with AsyncEngine's interface (ENGINE_PLAN.md) for the server's unit tests:
deterministic tokens, the P/D kv_transfer_params hand-over, named errors, a recorded abort."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from pd_runtime.engine.errors import EngineError, KVPullFailed


@dataclass
class Out:
    request_id: str
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    kv_transfer_params: dict | None = None


class CharTokenizer:
    """One token per character: id = ord(c) - 32 (printable ASCII); EOS = 95."""

    bos_token_id = None
    eos_token_ids = (95,)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) - 32 for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i + 32) for i in ids if i < 95)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


P_PARAMS = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
            "remote_block_ids": None, "remote_host": None, "remote_port": None}


def d_params(engine_id: str = "fake-p", **extra: Any) -> dict:
    return {"do_remote_prefill": True, "do_remote_decode": False,
            "remote_engine_id": engine_id, "remote_block_ids": {"0": [0, 1]},
            "remote_host": "127.0.0.1", "remote_port": 5600, "tp_size": 1,
            "remote_num_tokens": 5, "pd_protocol": 1, **extra}


@dataclass
class FakeEngine:
    tokenizer: Any = field(default_factory=CharTokenizer)
    max_model_len: int = 64
    delay_s: float = 0.0
    fail_with: EngineError | None = None
    calls: list[tuple[str, list[int], Any, dict | None]] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    pulls: int = 0

    def next_token(self, last: int) -> int:
        return 33 + (last % 26)  # 'A'..'Z'

    async def generate(self, request_id: str, prompt_ids: list[int], params: Any,
                       kv_transfer_params: dict | None = None) -> AsyncIterator[Out]:
        self.calls.append((request_id, list(prompt_ids), params, kv_transfer_params))
        if self.fail_with is not None:
            raise self.fail_with
        if kv_transfer_params and kv_transfer_params.get("do_remote_prefill"):
            if kv_transfer_params["remote_engine_id"] == "dead":
                raise KVPullFailed("prefill fake-dead is gone")
            self.pulls += 1
        n = params.max_tokens
        last, produced = prompt_ids[-1], 0
        for i in range(n):
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            last = self.next_token(last)
            produced += 1
            done = i == n - 1
            kv = None
            if done and kv_transfer_params and kv_transfer_params.get("do_remote_decode"):
                kv = d_params(remote_num_tokens=len(prompt_ids))
            yield Out(request_id, [last], chr(last + 32), done, "length" if done else None,
                      len(prompt_ids), produced, kv)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def stats(self) -> dict:
        return {"kv_pulls": self.pulls, "kv_pull_bytes": 1024 * self.pulls, "free_blocks": 7}

    def reference(self, prompt: str, n: int) -> str:
        last, out = self.tokenizer.encode(prompt)[-1], ""
        for _ in range(n):
            last = self.next_token(last)
            out += chr(last + 32)
        return out
