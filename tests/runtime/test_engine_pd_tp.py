"""P/D with tensor parallelism: AsyncEngines with TP 2 (rank 1 a worker process, gloo) against
TP 1 both ways, and TP 2 against TP 2 (D in a process of its own); the decode output equals
offline generate token for token."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys

import pytest

from pd_runtime.engine.async_engine import AsyncEngine, EngineArgs
from pd_runtime.engine.checkpoint import load_checkpoint
from pd_runtime.engine.generate import generate
from pd_runtime.engine.sampling import SamplingParams
from tests.engine_fixtures import ROUTER_P_PARAMS, write_tiny_llama
from tests.helpers import nixl_import_error

NIXL_ERR = nixl_import_error()
pytestmark = [
    pytest.mark.nixl,
    pytest.mark.slow,
    pytest.mark.timeout(240),
    pytest.mark.skipif(NIXL_ERR is not None, reason=f"nixl cannot be imported here: {NIXL_ERR}"),
]

TOKEN = "tp-test-token"
PROMPTS = [[5, 9, 33, 120, 7, 7, 81, 200, 3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26],
           [250, 1, 4], list(range(40, 77))]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny"), seed=21, kv_heads=4)


def two_free_ports() -> int:
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            base = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", base + 1))
                except OSError:
                    continue
                return base
    raise RuntimeError("no two consecutive free ports")


async def run_pd(model_dir: str, p_tp: int, d_tp: int) -> tuple[dict[str, list[int]], dict]:
    common = dict(model=model_dir, served_model_name="tiny", token=TOKEN, num_blocks=96,
                  seed=0)
    p = await AsyncEngine.start(EngineArgs(role="prefill", tensor_parallel_size=p_tp,
                                           block_size=16, kv_cache_layout="HND",
                                           side_channel_port=two_free_ports(), **common))
    try:
        d = await AsyncEngine.start(EngineArgs(role="decode", tensor_parallel_size=d_tp,
                                               block_size=8, kv_cache_layout="NHD", **common))
    except BaseException:
        await p.shutdown()
        raise
    try:
        async def one(i: int, prompt: list[int]) -> list[int]:
            kv = None
            async for o in p.generate(f"r{i}", prompt, SamplingParams(max_tokens=1, min_tokens=1,
                                                                     temperature=0),
                                      dict(ROUTER_P_PARAMS)):
                kv = o.kv_transfer_params or kv
            assert kv is not None and kv["tp_size"] == p_tp
            toks: list[int] = []
            async for o in d.generate(f"r{i}", prompt, SamplingParams(max_tokens=7, temperature=0),
                                      kv):
                toks += o.token_ids
            return toks

        outs = await asyncio.gather(*(one(i, pr) for i, pr in enumerate(PROMPTS)))
        for _ in range(200):  # P frees its blocks once every D rank has read them
            if p.stats()["kv_held"] == 0:
                break
            await asyncio.sleep(0.02)
        stats = {"p": p.stats(), "d": d.stats()}
        return {f"r{i}": o for i, o in enumerate(outs)}, stats
    finally:
        await d.shutdown()
        await p.shutdown()


@pytest.mark.parametrize("p_tp,d_tp", [(1, 2), (2, 1)])
def test_tp_pd_equals_offline(model_dir, p_tp, d_tp):
    got, stats = asyncio.run(asyncio.wait_for(run_pd(model_dir, p_tp, d_tp), 200))
    ckpt = load_checkpoint(model_dir)
    for i, pr in enumerate(PROMPTS):
        assert got[f"r{i}"] == generate(ckpt, pr, 7, ignore_eos=True), f"prompt {i}"
    assert stats["d"]["kv_pulls"] == len(PROMPTS) and stats["d"]["kv_pull_failures"] == 0
    assert stats["p"]["kv_held"] == 0 and stats["d"]["free_blocks"] == 96


async def prefill_then_decode_elsewhere(model_dir: str, d_args: dict, p_tp: int = 2,
                                        device: str = "cpu") -> tuple[list, dict, dict]:
    """P (TP `p_tp`) here prefills PROMPTS; D (`d_args`) in a process of its own decodes them
    (tests/gpu runs this on CUDA: P and D in one process would share one CUDA context)."""
    p = await AsyncEngine.start(EngineArgs(role="prefill", tensor_parallel_size=p_tp,
                                           block_size=16, model=model_dir,
                                           served_model_name="tiny", token=TOKEN, num_blocks=96,
                                           seed=0, device=device,
                                           side_channel_port=two_free_ports()))
    try:
        jobs = []
        for prompt in PROMPTS:
            kv = None
            async for o in p.generate(f"p{len(jobs)}", prompt,
                                      SamplingParams(max_tokens=1, temperature=0),
                                      dict(ROUTER_P_PARAMS)):
                kv = o.kv_transfer_params or kv
            jobs.append({"prompt": prompt, "kv": kv, "max_tokens": 7})
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.runtime.engine_decode_proc",
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            raw, _ = await asyncio.wait_for(
                proc.communicate(json.dumps({"args": d_args, "jobs": jobs}).encode()), 320)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        lines = [ln for ln in raw.decode().splitlines() if ln.startswith("RESULT ")]
        assert lines, raw.decode()[-2000:]
        out = json.loads(lines[0][7:])
        for _ in range(200):
            if p.stats()["kv_held"] == 0:
                break
            await asyncio.sleep(0.02)
        return out["tokens"], out["stats"], p.stats()
    finally:
        await p.shutdown()


@pytest.mark.timeout(480)
def test_tp2_to_tp2_equals_offline(model_dir):
    d_args = dict(role="decode", tensor_parallel_size=2, block_size=32, kv_cache_layout="NHD",
                  model=model_dir, served_model_name="tiny", token=TOKEN, num_blocks=48, seed=0)
    tokens, d_stats, p_stats = asyncio.run(asyncio.wait_for(
        prefill_then_decode_elsewhere(model_dir, d_args), 420))
    ckpt = load_checkpoint(model_dir)
    for i, pr in enumerate(PROMPTS):
        assert tokens[i] == generate(ckpt, pr, 7, ignore_eos=True), f"prompt {i}"
    assert d_stats["kv_pulls"] == len(PROMPTS) and d_stats["free_blocks"] == 48
    assert p_stats["kv_held"] == 0 and p_stats["free_blocks"] == 96  # every P rank released
