"""Scheduler + LLMEngine with a model-free runner that reads tokens back through the block tables."""

from __future__ import annotations

import random

import pytest

from pd_runtime import kvcache
from pd_runtime.engine.core import LLMEngine
from pd_runtime.engine.errors import DuplicateRequest, InvalidSamplingParams, PromptTooLong
from pd_runtime.engine.sampling import SamplingParams
from tests.unit.engine.fake_runner import Chunk, FakeRunner, reference

pytestmark = pytest.mark.timeout(60)


def make(num_blocks: int = 64, block_size: int = 4, family: str = "dense", window: int = 0,
         **kw) -> tuple[LLMEngine, FakeRunner]:
    m = kvcache.ModelSpec(family=family, num_layers=2, num_kv_heads=2, head_size=4,
                          sliding_window=window)
    spec = kvcache.RankSpec(m, block_size=block_size, num_blocks=num_blocks)
    runner = FakeRunner(spec)
    kw.setdefault("max_num_batched_tokens", 16)
    return LLMEngine(runner, spec, chunk_factory=Chunk, seed=0, **kw), runner


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    r = random.Random(seed)
    return [[r.randrange(64) for _ in range(r.randrange(1, 40))] for _ in range(n)]


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, **kw)


def test_concurrent_greedy_equals_reference_with_chunked_prefill():
    eng, runner = make()
    ps = prompts(6)
    outs = eng.generate(ps, [greedy(5 + i) for i in range(6)])
    for p, o, i in zip(ps, outs, range(6), strict=True):
        assert o == reference(p, 5 + i)
    assert max(len(b) for b in runner.batches) > 1  # really batched
    assert all(sum(len(c.token_ids) for c in b) <= 16 for b in runner.batches)  # token budget
    assert eng.blocks.usage() == 0.0  # everything freed


def test_new_requests_join_a_running_batch():
    eng, runner = make()
    eng.add_request("a", [1, 2, 3], greedy(20))
    got: dict[str, list[int]] = {"a": [], "b": []}
    for step in range(40):
        if step == 3:
            eng.add_request("b", [4, 5, 6, 7, 8], greedy(6))
        for o in eng.step():
            got[o.request_id] += o.token_ids
        if not eng.has_unfinished():
            break
    assert got["a"] == reference([1, 2, 3], 20)
    assert got["b"] == reference([4, 5, 6, 7, 8], 6)
    mixed = [b for b in runner.batches if len(b) == 2]
    assert mixed and any(len(c.token_ids) == 5 for b in mixed for c in b)  # prefill beside decode


def test_preemption_when_blocks_run_out_still_exact():
    # 12 blocks of 4 tokens: four 20-token sequences cannot all stay resident
    eng, _ = make(num_blocks=12, block_size=4, max_num_batched_tokens=32)
    ps = [[i + 1] * 10 for i in range(4)]
    outs = eng.generate(ps, greedy(10))
    assert outs == [reference(p, 10) for p in ps]
    assert eng.stats.preemptions > 0
    assert eng.blocks.usage() == 0.0


def test_sliding_window_frees_blocks_out_of_the_window():
    eng, runner = make(num_blocks=12, block_size=4, family="sliding", window=6,
                       max_num_batched_tokens=4)
    p = list(range(1, 30))
    out = eng.generate([p], greedy(8))[0]
    assert out == reference(p, 8, window=6)
    last = runner.batches[-1][0].block_tables[kvcache.GROUP_SLIDING]
    assert last[0] == -1 and last[-1] >= 0
    assert sum(b >= 0 for b in last) <= 4  # window 6 + one step of 4 tokens: at most 4 blocks
    assert -1 not in runner.batches[-1][0].block_tables[kvcache.GROUP_FULL]


def test_prompt_too_long_and_bad_requests_are_named():
    eng, _ = make(num_blocks=4, block_size=4)
    with pytest.raises(PromptTooLong) as e:
        eng.add_request("x", [1] * 15, greedy(2))
    assert e.value.http_status == 400 and "16" in str(e.value)
    with pytest.raises(InvalidSamplingParams):
        eng.add_request("y", [], greedy(1))
    eng.vocab_size = 64
    with pytest.raises(InvalidSamplingParams):
        eng.add_request("y", [64], greedy(1))
    eng.add_request("z", [1], greedy(1))
    with pytest.raises(DuplicateRequest):
        eng.add_request("z", [1], greedy(1))


def test_admission_control_waits_instead_of_failing():
    eng, _ = make(num_blocks=6, block_size=4, max_num_batched_tokens=64)
    ps = [[7] * 20, [8] * 20]  # each needs 6 blocks to finish: one at a time
    assert eng.generate(ps, greedy(4)) == [reference(p, 4) for p in ps]


def test_abort_frees_blocks_and_reports():
    eng, _ = make()
    eng.add_request("a", [1, 2, 3], greedy(50))
    eng.add_request("b", [1, 2, 3, 4], greedy(3))
    eng.step()
    eng.abort("a")
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    a = [o for o in outs if o.request_id == "a"]
    assert a[0].finished and a[0].finish_reason == "abort"
    assert eng.blocks.usage() == 0.0
    assert eng.stats.aborted == 1


def test_stop_token_ids_min_tokens_and_eos():
    eng, _ = make(eos_token_ids=[])
    p = [5, 6, 7]
    ref = reference(p, 10)
    stop_tok = ref[2]
    first = ref.index(stop_tok)
    out = eng.generate([p], greedy(10, stop_token_ids=[stop_tok]))[0]
    assert out == ref[: first + 1]
    # an EOS engine: min_tokens masks EOS, so the first token is the runner-up
    eng2, _ = make(eos_token_ids=[ref[0]])
    out2 = eng2.generate([p], greedy(3, min_tokens=1))[0]
    assert out2[0] == (ref[0] + 1) % 64
    eng3, _ = make(eos_token_ids=[ref[0]])
    assert eng3.generate([p], greedy(3))[0] == [ref[0]]
    eng4, _ = make(eos_token_ids=[ref[0]])
    assert eng4.generate([p], greedy(3, ignore_eos=True))[0] == ref[:3]


def test_stop_strings_cut_and_hold_back_while_streaming():
    eng, _ = make(detokenizer=lambda prompt: (lambda t: chr(ord("a") + t % 26)))
    p = [1, 2, 3]
    ref = reference(p, 12)
    text = "".join(chr(ord("a") + t % 26) for t in ref)
    stop = text[5:7]
    eng.add_request("r", p, greedy(12, stop=[stop]))
    chunks, fin = [], None
    while eng.has_unfinished():
        for o in eng.step():
            chunks.append(o.text)
            if o.finished:
                fin = o
    assert "".join(chunks) == text[: text.index(stop)]
    assert fin is not None and fin.finish_reason == "stop"
    for c in chunks:  # no streamed chunk ever contained the stop string's start after the cut
        assert stop not in c


def test_seeded_sampling_independent_of_batch_composition():
    def run(batch_mates: int) -> list[int]:
        eng, _ = make()
        ps = [[3, 1, 4, 1, 5]] + prompts(batch_mates, seed=9)
        params = [SamplingParams(max_tokens=12, temperature=1.5, seed=1234)]
        params += [SamplingParams(max_tokens=12, temperature=1.0) for _ in range(batch_mates)]
        return eng.generate(ps, params)[0]

    alone, crowded = run(0), run(5)
    assert alone == crowded
    ref = reference([3, 1, 4, 1, 5], 12)
    assert alone != ref  # temperature 1.5 over two close logits leaves the greedy path


class FakeDecodeSide:
    """Pulls by writing the prompt's tokens into the fake cache, after `gate` opens."""

    asynchronous = True

    def __init__(self, runner: FakeRunner, prompts: dict[str, list[int]], fail: bool = False):
        import threading

        from pd_runtime.engine.pd import PDStats

        self.runner, self.prompts, self.fail = runner, prompts, fail
        self.gate = threading.Event()
        self.stats = PDStats()
        self.beats: list[list[str]] = []

    def lease_s(self) -> float | None:
        return None

    def heartbeat(self, params) -> int:
        self.beats.append([p.remote_request_id for p in params])
        return len(params)

    def pull(self, p, d_req) -> int:
        from pd_runtime.engine.errors import KVPullFailed

        assert self.gate.wait(10)
        if self.fail:
            raise KVPullFailed("prefill went away")
        bs = self.runner.spec.block_size
        toks = self.prompts[p.remote_request_id]
        for g, table in d_req.block_tables.items():
            for pos in range(d_req.num_tokens):
                self.runner.cache[g][table[pos // bs], pos % bs] = toks[pos]
        self.stats.kv_pulls += 1
        return d_req.num_tokens


def d_params(rid: str, n: int) -> dict:
    return {"do_remote_prefill": True, "pd_protocol": 1, "remote_engine_id": "p",
            "remote_request_id": rid, "remote_block_ids": {"0": [0]}, "remote_host": "h",
            "remote_port": 1, "tp_size": 1, "remote_num_tokens": n}


def test_background_pull_does_not_stall_running_requests():
    eng, runner = make()
    remote = list(range(3, 30))
    side = FakeDecodeSide(runner, {"x": remote})
    eng.decode = side  # type: ignore[assignment]
    eng.add_request("local", [1, 2, 3], greedy(12))
    got: dict[str, list[int]] = {"local": eng.step()[0].token_ids, "remote": []}
    eng.add_request("remote", remote, greedy(5), d_params("x", len(remote) - 1))
    for _ in range(6):  # the pull is blocked: the local request keeps decoding
        for o in eng.step():
            got[o.request_id] += o.token_ids
    assert len(got["local"]) >= 6 and got["remote"] == []
    assert eng.snapshot()["pulling"] == 1
    side.gate.set()
    while eng.has_unfinished():
        for o in eng.step():
            got[o.request_id] += o.token_ids
    assert got["local"] == reference([1, 2, 3], 12)
    assert got["remote"] == reference(remote, 5)
    # only the last prompt token was computed by D for the remote request
    remote_chunks = [c for b in runner.batches for c in b if c.token_ids[:1] == remote[-1:]]
    assert remote_chunks and remote_chunks[0].start_pos == len(remote) - 1
    assert eng.blocks.usage() == 0.0


def test_failed_or_aborted_pull_frees_blocks_and_never_gives_tokens():
    eng, runner = make()
    side = FakeDecodeSide(runner, {"x": [5] * 20}, fail=True)
    eng.decode = side  # type: ignore[assignment]
    eng.add_request("r", [5] * 20, greedy(5), d_params("x", 19))
    eng.step()
    side.gate.set()
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    assert [o.token_ids for o in outs] == [[]] and outs[0].finish_reason == "error"
    assert outs[0].error is not None and outs[0].error.http_status == 503
    assert eng.blocks.usage() == 0.0
    # aborted while the pull is in flight: blocks stay until the pull ends, then go
    side.fail, side.gate = False, type(side.gate)()
    eng.add_request("a", [5] * 20, greedy(5), d_params("x", 19))
    eng.step()
    eng.abort("a")
    outs = eng.step()
    assert outs[0].finish_reason == "abort" and eng.blocks.usage() > 0
    side.gate.set()
    while eng.has_unfinished():
        assert not [o for o in eng.step() if o.token_ids]
    assert eng.blocks.usage() == 0.0
    eng.close()


def test_queued_decode_requests_keep_their_prefill_leases_alive():
    eng, runner = make(max_num_seqs=1, heartbeat_s=0.0)
    side = FakeDecodeSide(runner, {"x": [4] * 9})
    side.gate.set()
    eng.decode = side  # type: ignore[assignment]
    eng.add_request("local", [1, 2, 3], greedy(5))
    eng.add_request("remote", [4] * 9, greedy(2), d_params("x", 8))
    while eng.has_unfinished():
        eng.step()
    assert side.beats and all(b == ["x"] for b in side.beats)  # while it waited for a slot
    assert len(side.beats) >= 4  # one per step of the local request
