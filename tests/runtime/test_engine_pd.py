"""P/D through two LLMEngines, KV moved by NIXL over UCX (host memory).

The decode engine's greedy output equals offline `generate` token for token (dense, sliding
window, MLA, MoE, fp8 KV; P block 16 -> D block 32, HND <-> NHD); an expired lease and a killed
prefill process are errors (never tokens); malformed kv_transfer_params are refused (400);
blocks are freed on both sides. Checked once by hand: flipping one byte of P's held KV makes
the decode output differ from offline generation, so these equalities do catch bad bytes.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time

import pytest

from pd_runtime.engine.checkpoint import load_checkpoint
from pd_runtime.engine.core import LLMEngine, Output, engine_from_checkpoint, rank_spec_for
from pd_runtime.engine.errors import InvalidKVTransferParams, KVPullFailed
from pd_runtime.engine.generate import generate
from pd_runtime.engine.pd import (
    DecodeSide,
    engine_factors,
    make_prefill_side,
    parse_kv_transfer_params,
)
from pd_runtime.engine.sampling import SamplingParams
from tests.engine_fixtures import ROUTER_P_PARAMS, write_tiny_llama
from tests.helpers import nixl_import_error

NIXL_ERR = nixl_import_error()
pytestmark = [
    pytest.mark.nixl,
    pytest.mark.slow,
    pytest.mark.timeout(180),
    pytest.mark.skipif(NIXL_ERR is not None, reason=f"nixl cannot be imported here: {NIXL_ERR}"),
]

TOKEN = "test-side-channel-token"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny"), seed=11, kv_heads=4)


@pytest.fixture(scope="module")
def ckpt(model_dir):
    return load_checkpoint(model_dir)


def make_pair(ckpt, p_block=16, d_block=32, p_layout="HND", d_layout="NHD", lease_s=30.0,
              cache_dtype="auto"):
    f = engine_factors(ckpt.config, "tiny", cache_dtype)
    ps = rank_spec_for(ckpt.config, block_size=p_block, layout=p_layout, num_blocks=1024 // p_block,
                       cache_dtype=cache_dtype)
    p = engine_from_checkpoint(ckpt, ps, seed=0)
    assert p.arena is not None
    p.prefill = make_prefill_side(ps, f, TOKEN, p.arena, lease_s=lease_s)
    ds = rank_spec_for(ckpt.config, block_size=d_block, layout=d_layout, num_blocks=1024 // d_block,
                       cache_dtype=cache_dtype)
    d = engine_from_checkpoint(ckpt, ds, seed=0)
    assert d.arena is not None
    d.decode = DecodeSide(ds, f, TOKEN, d.arena, timeout=10.0)
    return p, d


def close(p: LLMEngine, d: LLMEngine) -> None:
    assert d.decode is not None and p.prefill is not None
    d.decode.close()
    p.prefill.close()


def drain(eng: LLMEngine, limit: int = 500) -> list[Output]:
    outs: list[Output] = []
    for _ in range(limit):
        if not eng.has_unfinished():
            return outs
        outs += eng.step()
    raise AssertionError("engine did not finish")


def wait_released(p: LLMEngine, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while p.held and time.monotonic() < end:
        p.step()
        time.sleep(0.01)
    assert not p.held, "prefill still holds blocks"
    assert p.blocks.usage() == 0.0


def prompts(n: int, seed: int) -> list[list[int]]:
    r = random.Random(seed)
    return [[r.randrange(2, 256) for _ in range(r.randrange(2, 70))] for _ in range(n)]


def prefill_all(p: LLMEngine, ps: list[list[int]]) -> dict[str, dict]:
    for i, pr in enumerate(ps):
        p.add_request(f"q{i}", pr, SamplingParams(max_tokens=1, min_tokens=1, temperature=0),
                      dict(ROUTER_P_PARAMS))
    kv = {}
    for o in drain(p):
        assert o.error is None
        if o.finished:
            assert len(o.token_ids) == 1 and o.kv_transfer_params is not None
            kv[o.request_id] = o.kv_transfer_params
    return kv


@pytest.mark.parametrize("cell", [
    dict(p_block=16, d_block=32, p_layout="HND", d_layout="NHD"),
    dict(p_block=16, d_block=16, p_layout="NHD", d_layout="HND"),
])
def test_disaggregated_equals_offline(ckpt, cell):
    p, d = make_pair(ckpt, **cell)
    try:
        ps = prompts(4, seed=1) + [[7]]  # a one-token prompt has nothing to pull
        lens = [8, 5, 11, 3, 4]
        kv = prefill_all(p, ps)
        for i, pr in enumerate(ps):
            d.add_request(f"q{i}", pr, SamplingParams(max_tokens=lens[i], temperature=0),
                          kv[f"q{i}"])
        got: dict[str, list[int]] = {}
        for o in drain(d):
            assert o.error is None, o.error
            got.setdefault(o.request_id, []).extend(o.token_ids)
        for i, pr in enumerate(ps):
            want = generate(ckpt, pr, lens[i], ignore_eos=True)
            assert got[f"q{i}"] == want, f"prompt {i} ({len(pr)} tokens)"
        assert d.decode is not None and d.decode.stats.kv_pulls == 4
        assert d.decode.stats.kv_pull_bytes > 0
        assert d.blocks.usage() == 0.0
        wait_released(p)
    finally:
        close(p, d)


@pytest.mark.parametrize("family,cache_dtype,p_block,d_block", [
    ("sliding", "auto", 4, 8), ("mla", "auto", 16, 8), ("moe", "auto", 8, 16),
    ("dense", "fp8", 16, 32), ("hybrid", "auto", 16, 8),
])
def test_families_disaggregated_equal_offline(tmp_path, family, cache_dtype, p_block, d_block):
    pytest.importorskip("transformers")
    from tests.engine_fixtures import write_family

    ck = load_checkpoint(write_family(tmp_path / family, family, seed=2))
    p, d = make_pair(ck, p_block, d_block, "NHD", "HND", cache_dtype=cache_dtype)
    try:
        ps = prompts(3, seed=7)
        kv = prefill_all(p, ps)
        for i, pr in enumerate(ps):
            d.add_request(f"q{i}", pr, SamplingParams(max_tokens=6, temperature=0), kv[f"q{i}"])
        got: dict[str, list[int]] = {}
        for o in drain(d):
            assert o.error is None, o.error
            got.setdefault(o.request_id, []).extend(o.token_ids)
        for i, pr in enumerate(ps):
            want = generate(ck, pr, 6, ignore_eos=True, cache_dtype=cache_dtype)
            assert got[f"q{i}"] == want, f"prompt {i} ({len(pr)} tokens)"
        assert d.blocks.usage() == 0.0
        wait_released(p)
    finally:
        close(p, d)


def test_tables_that_do_not_fit_the_prefill_geometry_are_400(ckpt):
    p, d = make_pair(ckpt)
    try:
        pr = prompts(1, seed=3)[0] + [1, 2, 3]
        kv = prefill_all(p, [pr])["q0"]
        bad = {**kv, "remote_block_ids": {"0": kv["remote_block_ids"]["0"] + [7]}}
        bad.pop("remote_block_size")  # only the handshake can tell: checked before the pull
        d.add_request("q0", pr, SamplingParams(max_tokens=4, temperature=0), bad)
        outs = drain(d)
        assert [o.token_ids for o in outs] == [[]]
        assert isinstance(outs[0].error, InvalidKVTransferParams)
        assert outs[0].error.http_status == 400
        assert d.blocks.usage() == 0.0
        far = {**kv, "remote_block_ids": {"0": [10_000] * len(kv["remote_block_ids"]["0"])}}
        d.add_request("q1", pr, SamplingParams(max_tokens=4, temperature=0), far)
        assert isinstance(drain(d)[0].error, InvalidKVTransferParams)
        d.add_request("q2", pr, SamplingParams(max_tokens=4, temperature=0), kv)  # still fine
        assert [t for o in drain(d) for t in o.token_ids] == generate(ckpt, pr, 4, ignore_eos=True)
    finally:
        close(p, d)


def test_heartbeats_keep_a_queued_request_past_its_lease(ckpt):
    lease_s = 2.0  # 1 s left too little slack for a beat's round trip on 2 loaded cores
    p, d = make_pair(ckpt, lease_s=lease_s)
    try:
        a, b = prompts(2, seed=6)
        kv = prefill_all(p, [a, b])
        d.add_request("q0", a, SamplingParams(max_tokens=2, temperature=0), kv["q0"])
        drain(d)  # connects D to P
        assert d.decode is not None
        params = parse_kv_transfer_params(kv["q1"], len(b))
        end = time.monotonic() + 2.5 * lease_s  # q1 waits 2.5 leases, beating every 0.3 s
        while time.monotonic() < end:
            assert d.decode.heartbeat([params]) == 1  # type: ignore[list-item]
            time.sleep(0.3)
        d.add_request("q1", b, SamplingParams(max_tokens=4, temperature=0), kv["q1"])
        got = [t for o in drain(d) for t in o.token_ids]
        assert got == generate(ckpt, b, 4, ignore_eos=True)
    finally:
        close(p, d)


def test_expired_lease_is_an_error_never_tokens(ckpt):
    p, d = make_pair(ckpt, lease_s=0.3)
    try:
        pr = prompts(1, seed=2)[0] + [3, 4, 5]
        kv = prefill_all(p, [pr])["q0"]
        time.sleep(0.6)
        wait_released(p)  # the lease expired: P freed the blocks by itself
        d.add_request("q0", pr, SamplingParams(max_tokens=4, temperature=0), kv)
        outs = drain(d)
        assert [o.token_ids for o in outs] == [[]]
        assert outs[0].finish_reason == "error" and isinstance(outs[0].error, KVPullFailed)
        assert outs[0].error.http_status == 503
        assert d.blocks.usage() == 0.0
        assert d.decode is not None and d.decode.stats.kv_pull_failures == 1
    finally:
        close(p, d)


BAD = [
    "not a dict",
    {"do_remote_prefill": True},
    {"do_remote_prefill": True, "do_remote_decode": True},
    {"do_remote_decode": "yes"},
]


def good_params(n: int) -> dict:
    return {"do_remote_prefill": True, "do_remote_decode": False, "pd_protocol": 1,
            "remote_engine_id": "e1", "remote_request_id": "r1", "remote_block_ids": {"0": [0]},
            "remote_host": "127.0.0.1", "remote_port": 5600, "tp_size": 1,
            "remote_num_tokens": n}


@pytest.mark.parametrize("change", [
    {"pd_protocol": 2}, {"remote_port": 0}, {"remote_port": "5600"}, {"tp_size": 0},
    {"remote_num_tokens": 99}, {"remote_request_id": "a:b"}, {"remote_block_ids": {"7": [1]}},
    {"remote_block_ids": {"0": [-5]}}, {"remote_host": ""}, {"remote_engine_id": None},
    {"remote_block_ids": {"0": [0, 1]}, "remote_block_size": 16}, {"remote_block_size": 0},
])
def test_malformed_kv_transfer_params_are_refused(ckpt, change):
    with pytest.raises(InvalidKVTransferParams) as e:
        parse_kv_transfer_params({**good_params(4), **change}, 5)
    assert e.value.http_status == 400
    for bad in BAD:
        with pytest.raises(InvalidKVTransferParams):
            parse_kv_transfer_params(bad, 5)
    assert parse_kv_transfer_params(good_params(4), 5).remote_num_tokens == 4  # type: ignore[union-attr]



def start_prefill_proc(model_dir: str, ps: list[list[int]]) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen([sys.executable, "-m", "tests.runtime.engine_prefill_proc"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps({"model": model_dir, "token": TOKEN, "prompts": ps}) + "\n")
    proc.stdin.flush()
    return proc, read_result(proc)


def read_result(proc: subprocess.Popen) -> dict:
    """The next `RESULT <json>` line (NIXL logs to stdout too)."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    proc.kill()
    raise AssertionError("the prefill process ended without a result")


def test_prefill_process_killed_is_an_error_then_a_new_one_works(ckpt, model_dir):
    _, d = make_pair(ckpt)
    assert d.decode is not None
    a, b = prompts(2, seed=4)
    procs = []
    try:
        proc, kv = start_prefill_proc(model_dir, [a, b])
        procs.append(proc)
        d.add_request("q0", a, SamplingParams(max_tokens=3, temperature=0), kv["q0"])
        got = [t for o in drain(d) for t in o.token_ids]
        assert got == generate(ckpt, a, 3, ignore_eos=True)  # a real cross-process pull
        proc.kill()  # P dies with q1 still held; D's cached connection is now dead
        proc.wait(10)
        d.add_request("q1", b, SamplingParams(max_tokens=3, temperature=0), kv["q1"])
        outs = drain(d)
        assert [o.token_ids for o in outs] == [[]]
        assert outs[0].finish_reason == "error" and isinstance(outs[0].error, KVPullFailed)
        assert d.blocks.usage() == 0.0
        proc2, kv2 = start_prefill_proc(model_dir, [b])  # a restarted P: D connects again
        procs.append(proc2)
        d.add_request("q1", b, SamplingParams(max_tokens=3, temperature=0), kv2["q0"])
        got = [t for o in drain(d) for t in o.token_ids]
        assert got == generate(ckpt, b, 3, ignore_eos=True)
        assert proc2.stdin is not None and proc2.stdout is not None
        proc2.stdin.close()  # P reports what it still holds when it stops
        assert read_result(proc2) == {"held": 0}
    finally:
        d.decode.close()
        for pr in procs:
            if pr.poll() is None:
                pr.kill()
            pr.wait(10)
