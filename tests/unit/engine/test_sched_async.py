"""AsyncEngine: concurrent requests over the background step loop, client disconnects, errors."""

from __future__ import annotations

import asyncio

import pytest

from pd_runtime.engine.async_engine import AsyncEngine, EngineArgs
from pd_runtime.engine.checkpoint import load_checkpoint
from pd_runtime.engine.errors import InvalidKVTransferParams, PromptTooLong
from pd_runtime.engine.generate import generate
from pd_runtime.engine.sampling import SamplingParams
from tests.engine_fixtures import write_tiny_llama

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny"), seed=5, kv_heads=4)


async def collect(eng: AsyncEngine, rid: str, prompt: list[int], n: int) -> list[int]:
    toks: list[int] = []
    async for o in eng.generate(rid, prompt, SamplingParams(max_tokens=n, temperature=0)):
        toks += o.token_ids
    return toks


def test_concurrent_requests_abort_and_errors(model_dir):
    ckpt = load_checkpoint(model_dir)
    prompts = [[3, 4, 5, 6], list(range(10, 50)), [7] * 9]

    async def main() -> None:
        eng = await AsyncEngine.start(EngineArgs(model=model_dir, num_blocks=64, seed=0,
                                                 max_num_batched_tokens=16))
        try:
            outs = await asyncio.gather(*(collect(eng, f"r{i}", p, 6 + i)
                                          for i, p in enumerate(prompts)))
            for i, p in enumerate(prompts):
                assert outs[i] == generate(ckpt, p, 6 + i, ignore_eos=True)
            # a client that goes away after two chunks: the request is aborted, blocks freed
            gen = eng.generate("gone", [1, 2, 3], SamplingParams(max_tokens=200, temperature=0))
            n = 0
            async for _ in gen:
                n += 1
                if n == 2:
                    break
            await gen.aclose()  # type: ignore[attr-defined]
            for _ in range(200):
                st = eng.stats()
                if st["aborted"] == 1 and st["running"] == 0:
                    break
                await asyncio.sleep(0.02)
            assert st["aborted"] == 1 and st["free_blocks"] == 64
            with pytest.raises(PromptTooLong):
                await collect(eng, "long", [1] * 2000, 4)
            with pytest.raises(InvalidKVTransferParams):
                async for _ in eng.generate("bad", [1, 2], SamplingParams(),
                                            {"do_remote_prefill": True}):
                    pass
            assert eng.stats()["generation_tokens"] >= sum(6 + i for i in range(3))
        finally:
            await eng.shutdown()

    asyncio.run(asyncio.wait_for(main(), 100))


class _GatherStillRunning:
    """A prefill side whose staged gathers end after `polls` advertise() calls (None before)."""

    def __init__(self, polls: int | None):
        self.polls, self.calls = polls, 0

    def advertise(self, params: dict) -> dict | None:
        self.calls += 1
        if self.polls is None or self.calls <= self.polls:
            return None
        return {**params, "staged_slots": {"k": [0, 8]}}


@pytest.mark.parametrize("polls", [0, 3, None])
def test_p_answer_waits_for_the_staged_gathers_then_names_their_slots(monkeypatch, polls):
    """P's answer goes once the gathers staged at hold() have ended, naming their slots; when
    they do not end within ADVERTISE_WAIT_S it goes as hold() made it (D asks P first)."""
    from types import SimpleNamespace

    from pd_runtime.engine import async_engine
    from pd_runtime.engine.core import Output

    monkeypatch.setattr(async_engine, "ADVERTISE_WAIT_S", 0.05)
    eng = AsyncEngine.__new__(AsyncEngine)
    side = _GatherStillRunning(polls)
    eng.engine = SimpleNamespace(prefill=side)  # type: ignore[assignment]
    out = Output("r", [5], "x", True, "length", 3, 1, {"remote_request_id": "t"})
    got = asyncio.run(eng._advertised(out))
    if polls is None:
        assert got is out and side.calls > 1
    else:
        assert got.kv_transfer_params == {"remote_request_id": "t", "staged_slots": {"k": [0, 8]}}
        assert side.calls == polls + 1 and got.token_ids == [5]
