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
