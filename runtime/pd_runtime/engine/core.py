"""LLMEngine: the synchronous step loop (schedule, pull, forward, sample, stop, free).

Not thread-safe: one thread owns it (AsyncEngine's loop thread, or a test). Every request-level
failure is an Output carrying a named EngineError; the engine itself keeps running.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .. import kvcache
from .blocks import BlockManager
from .errors import (
    DuplicateRequest,
    EngineError,
    InvalidSamplingParams,
    KVHoldFailed,
    KVPullFailed,
    PromptTooLong,
)
from .pd import DecodeKVParams, DecodeSide, PrefillSide, RemoteDecode, parse_kv_transfer_params
from .sampling import SamplingParams, sample
from .scheduler import Scheduler, Sequence, Status, new_sequence


@dataclass
class Output:
    """One chunk of a request's output."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" | None
    prompt_tokens: int
    completion_tokens: int
    kv_transfer_params: dict | None = None
    error: EngineError | None = None  # set when finish_reason == "error"


PULL_POLL_S = 0.01
HEARTBEAT_S = 5.0  # queued decode requests extend their prefill leases this often


class Runner(Protocol):
    def execute(self, batch: list) -> torch.Tensor: ...


@dataclass
class EngineStats:
    requests: int = 0
    finished: int = 0
    aborted: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    steps: int = 0
    step_tokens: int = 0
    preemptions: int = 0


class LLMEngine:
    def __init__(self, runner: Runner, spec: kvcache.RankSpec, *,
                 eos_token_ids: Seq[int] = (), vocab_size: int | None = None,
                 detokenizer: Callable[[list[int]], Any] | None = None,
                 max_model_len: int | None = None, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 512, prefill: PrefillSide | None = None,
                 decode: DecodeSide | None = None, seed: int | None = None,
                 chunk_factory: Callable[..., Any] | None = None,
                 heartbeat_s: float = HEARTBEAT_S):
        self.runner, self.spec = runner, spec
        self.eos = set(eos_token_ids)
        self.vocab_size = vocab_size
        self.detokenizer = detokenizer
        self.blocks = BlockManager(spec.model, spec.block_size, spec.num_blocks,
                                   spec.num_state_slots)
        cap = spec.num_blocks * spec.block_size
        self.max_model_len = min(max_model_len or cap, cap)
        if spec.model.family == "sliding":
            live = spec.model.sliding_window + max_num_batched_tokens
            if kvcache.blocks_needed(live, spec.block_size) + 1 > spec.num_blocks:
                raise ValueError(f"{spec.num_blocks} blocks cannot hold a sliding window of "
                                 f"{spec.model.sliding_window} plus a step of "
                                 f"{max_num_batched_tokens} tokens")
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens)
        self.prefill, self.decode = prefill, decode
        self.seqs: dict[str, Sequence] = {}  # request id -> live sequence
        self.held: dict[str, Sequence] = {}  # key -> finished P sequence whose blocks D may read
        self.stats = EngineStats()
        self._keys = itertools.count()
        self._rng = torch.Generator().manual_seed(seed if seed is not None else time.time_ns())
        self._pending: list[Output] = []
        self._inflight: dict[Sequence, tuple[Future, int]] = {}  # pulls: (future, tokens)
        self._pull_pool: ThreadPoolExecutor | None = None
        self.heartbeat_s = heartbeat_s
        self._last_heartbeat = time.monotonic()
        if chunk_factory is None:
            from .runner import SeqChunk

            chunk_factory = SeqChunk
        self._chunk = chunk_factory
        self.arena: torch.Tensor | None = None  # the KV arena, when built by engine_from_checkpoint

    # ---- requests -------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    kv_transfer_params: dict | None = None) -> None:
        """Queue a request; raises a named EngineError (400) for one that can never run."""
        if request_id in self.seqs:
            raise DuplicateRequest(f"request id {request_id!r} is already running")
        if not prompt_ids:
            raise InvalidSamplingParams("the prompt is empty")
        if self.vocab_size is not None and any(not 0 <= t < self.vocab_size for t in prompt_ids):
            raise InvalidSamplingParams(f"prompt token id outside the vocabulary "
                                        f"(0..{self.vocab_size - 1})")
        total = len(prompt_ids) + params.max_tokens
        if total > self.max_model_len:
            raise PromptTooLong(
                f"this model's maximum context length is {self.max_model_len} tokens; the request "
                f"needs {total} ({len(prompt_ids)} in the prompt, {params.max_tokens} to generate)")
        role = parse_kv_transfer_params(kv_transfer_params, len(prompt_ids))
        if isinstance(role, RemoteDecode) and self.prefill is None:
            raise EngineError("this engine has no KV transfer configured (not a prefill engine)",
                              code="kv_transfer_unavailable", http_status=400)
        if isinstance(role, DecodeKVParams) and self.decode is None:
            raise EngineError("this engine has no KV transfer configured (not a decode engine)",
                              code="kv_transfer_unavailable", http_status=400)
        detok = self.detokenizer(list(prompt_ids)) if self.detokenizer else None
        seq = new_sequence(request_id, f"s{next(self._keys)}", prompt_ids, params, detok)
        seq.remote_decode = isinstance(role, RemoteDecode)
        if isinstance(role, DecodeKVParams):
            seq.remote_prefill = role
        self.seqs[request_id] = seq
        self.scheduler.add(seq)
        self.stats.requests += 1
        self.stats.prompt_tokens += len(prompt_ids)

    def abort(self, request_id: str) -> None:
        seq = self.seqs.get(request_id)
        if seq is not None:
            self.stats.aborted += 1
            self._pending.append(self._finish(seq, "abort"))

    def tick(self) -> None:
        """Called while idle: lets a TP runner keep its workers inside the group timeout."""
        tick = getattr(self.runner, "tick", None)
        if tick is not None:
            tick()

    def has_unfinished(self) -> bool:
        return bool(self.seqs) or bool(self._pending) or bool(self._inflight)

    def close(self) -> None:
        """Stop the pull thread (after the pull in flight, if any)."""
        if self._pull_pool is not None:
            self._pull_pool.shutdown(wait=True, cancel_futures=True)

    # ---- the step -------------------------------------------------------------------------

    def step(self) -> list[Output]:
        outs, self._pending = self._pending, []
        self._reap_held()
        self._heartbeat()
        self._collect_pulls(outs)
        so = self.scheduler.schedule()
        self.stats.preemptions += len(so.preempted)
        for seq, n in so.pulls:
            self._start_pull(seq, n)
        chunks = so.chunks
        if not chunks:
            if self._inflight:  # only pulls to wait for: do not spin
                wait([f for f, _ in self._inflight.values()], PULL_POLL_S, FIRST_COMPLETED)
                self._collect_pulls(outs)
            return outs
        batch = []
        for c in chunks:
            end = c.start + c.num_tokens
            n = kvcache.blocks_needed(end, self.spec.block_size)
            tables = {g: t[:n] for g, t in self.blocks.tables(c.seq.key).items()}
            batch.append(self._make_chunk(c.seq, c.start, end, tables))
        logits = self.runner.execute(batch)
        self.stats.steps += 1
        self.stats.step_tokens += sum(c.num_tokens for c in chunks)
        rows = [i for i, c in enumerate(chunks) if c.samples]
        for c in chunks:
            c.seq.num_computed = c.start + c.num_tokens
        if not rows:
            return outs
        seqs = [chunks[i].seq for i in rows]
        toks = sample(logits[rows], [s.params for s in seqs], [s.generator for s in seqs],
                      [self._banned(s) for s in seqs], self._rng)
        for seq, tok in zip(seqs, toks, strict=True):
            outs.append(self._append(seq, tok))
        return outs

    def _make_chunk(self, seq: Sequence, start: int, end: int, tables: dict) -> Any:
        slot = self.blocks.state_slot(seq.key)
        scratch = self.blocks.scratch_slot(seq.key)
        if scratch is not None and start >= len(seq.prompt_ids) - 1:
            # hybrid-ssm P: from the state of T - 1 tokens (kept for D) into the scratch slot
            return self._chunk(seq.tokens(start, end), start, tables, scratch,
                               state_src_slot=slot)
        return self._chunk(seq.tokens(start, end), start, tables, slot)

    def _heartbeat(self) -> None:
        """Queued decode requests keep their leases on P alive while they wait for blocks."""
        if self.decode is None:
            return
        now = time.monotonic()
        lease = self.decode.lease_s()
        every = min(self.heartbeat_s, lease / 3) if lease else self.heartbeat_s
        if now - self._last_heartbeat < every:
            return
        self._last_heartbeat = now
        queued = [s.remote_prefill for s in self.scheduler.waiting if s.needs_pull]
        if queued:
            self.decode.heartbeat(queued)

    def _start_pull(self, seq: Sequence, n: int) -> None:
        """Pull the first `n` tokens' KV into `seq`'s blocks: on the pull thread when the
        transfer side allows it (running requests keep decoding meanwhile), else right here."""
        assert self.decode is not None  # add_request refuses D requests otherwise
        req = self.blocks.transfer_request(seq.key, n)
        fut: Future = Future()
        if getattr(self.decode, "asynchronous", False):
            if self._pull_pool is None:
                self._pull_pool = ThreadPoolExecutor(1, thread_name_prefix="kv-pull")
            fut = self._pull_pool.submit(self.decode.pull, seq.remote_prefill, req)
        else:
            try:
                fut.set_result(self.decode.pull(seq.remote_prefill, req))
            except BaseException as e:  # noqa: BLE001 - handed over like a thread's failure
                fut.set_exception(e)
        self._inflight[seq] = (fut, n)

    def _collect_pulls(self, outs: list[Output]) -> None:
        for seq, (fut, n) in list(self._inflight.items()):
            if not fut.done():
                continue
            del self._inflight[seq]
            if seq.status is Status.FINISHED:  # aborted while its KV was arriving
                self.blocks.free(seq.key)
                continue
            err = fut.exception()
            if err is None:
                self.scheduler.pull_done(seq, n)
                continue
            if not isinstance(err, EngineError):
                err = KVPullFailed(f"KV pull failed: {type(err).__name__}: {err}")
            self.stats.failed += 1
            outs.append(self._finish(seq, "error", err))

    def _banned(self, seq: Sequence) -> list[int]:
        if len(seq.output_ids) >= seq.params.min_tokens:
            return []
        return sorted(self.eos | set(seq.params.stop_token_ids))

    def _append(self, seq: Sequence, tok: int) -> Output:
        seq.output_ids.append(tok)
        self.stats.generation_tokens += 1
        p, n = seq.params, len(seq.output_ids)
        reason = None
        if tok in p.stop_token_ids or (tok in self.eos and not p.ignore_eos):
            reason = "stop"
        if reason is None:
            text, hit = seq.text.push(tok, check_stop=n >= p.min_tokens)
            if hit:
                reason = "stop"
        else:
            text = ""  # a stop token's own text is not part of the output (as vLLM)
        if reason is None and (n >= p.max_tokens or seq.num_tokens >= self.max_model_len
                               or seq.remote_decode):
            reason = "length"  # (a prefill for a decode engine answers one token)
        if reason is None:
            return self._output(seq, [tok], text, None)
        out = self._finish(seq, reason, token_ids=[tok], text=text)
        return out

    def _output(self, seq: Sequence, toks: list[int], text: str, reason: str | None,
                kv: dict | None = None, error: EngineError | None = None) -> Output:
        return Output(seq.request_id, toks, text, reason is not None, reason, len(seq.prompt_ids),
                      len(seq.output_ids), kv, error)

    def _finish(self, seq: Sequence, reason: str, error: EngineError | None = None,
                token_ids: list[int] | None = None, text: str = "") -> Output:
        self.scheduler.remove(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        self.seqs.pop(seq.request_id, None)
        if reason not in ("abort", "error"):
            text += seq.text.flush()
            self.stats.finished += 1
        kv = None
        if seq.remote_decode and reason in ("stop", "length") and self.prefill is not None:
            self.blocks.drop_scratch(seq.key)
            req = self.blocks.transfer_request(seq.key, len(seq.prompt_ids) - 1)
            try:
                kv = self.prefill.hold(seq.key, req)
            except Exception as e:  # noqa: BLE001 - this request fails, named; the engine runs
                error = KVHoldFailed(f"the prefill engine could not keep the KV: "
                                     f"{type(e).__name__}: {e}")
                reason, token_ids, text = "error", [], ""
                seq.finish_reason = reason
            else:
                if req.num_tokens > 0:
                    self.held[seq.key] = seq
        if seq.key not in self.held and seq not in self._inflight:
            self.blocks.free(seq.key)  # (a pull still writing into them: freed when it ends)
        return self._output(seq, token_ids or [], text, reason, kv, error)

    def _reap_held(self) -> None:
        if self.prefill is None or not self.held:
            return
        for key in self.prefill.released():
            if self.held.pop(key, None) is not None:
                self.blocks.free(key)

    # ---- offline use ----------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 max_steps: int = 1_000_000) -> list[list[int]]:
        """Run `prompts` to completion together; the generated token ids of each."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"gen-{next(self._keys)}" for _ in prompts]
        for rid, pr, p in zip(ids, prompts, plist, strict=True):
            self.add_request(rid, pr, p)
        got: dict[str, list[int]] = {rid: [] for rid in ids}
        for _ in range(max_steps):
            if not self.has_unfinished():
                break
            for o in self.step():
                if o.error is not None:
                    raise o.error
                got[o.request_id].extend(o.token_ids)
        return [got[r] for r in ids]

    def snapshot(self) -> dict:
        s = self.stats
        d = {"requests": s.requests, "finished": s.finished, "aborted": s.aborted,
             "failed": s.failed, "prompt_tokens": s.prompt_tokens,
             "generation_tokens": s.generation_tokens, "steps": s.steps,
             "preemptions": s.preemptions, "running": len(self.scheduler.running),
             "waiting": len(self.scheduler.waiting), "pulling": len(self.scheduler.pulling),
             "kv_held": len(self.held),
             "kv_usage": self.blocks.usage()}
        for side in (self.prefill, self.decode):
            if side is not None:
                st = side.stats
                d.update({"kv_pulls": st.kv_pulls, "kv_pull_failures": st.kv_pull_failures,
                          "kv_pull_bytes": st.kv_pull_bytes, "kv_holds": st.kv_holds,
                          "kv_releases": st.kv_releases})
        return d


def rank_spec_for(cfg: Any, *, block_size: int = 16, layout: str = "HND",
                  cache_dtype: str = "auto", num_blocks: int = 256, tp_size: int = 1,
                  tp_rank: int = 0, num_state_slots: int = 8) -> kvcache.RankSpec:
    """The KV geometry of one rank of an engine for model config `cfg` (config.ModelConfig)."""
    return kvcache.RankSpec(cfg.model_spec(cache_dtype), tp_size, tp_rank, block_size, layout,
                            num_blocks, num_state_slots)


def engine_from_checkpoint(ckpt: Any, spec: kvcache.RankSpec, *, device: str = "cpu",
                           arena: torch.Tensor | None = None, group: object = None,
                           **engine_kw: Any) -> LLMEngine:
    """An LLMEngine over a fresh (or the given) KV arena; the arena is `engine.arena`."""
    from .kv import KVCache
    from .runner import ModelRunner

    if arena is None:
        arena = torch.zeros(kvcache.arena_layout(spec).nbytes, dtype=torch.uint8, device=device)
    runner = ModelRunner(ckpt, KVCache(spec, arena), device, spec.tp_rank, spec.tp_size, group)
    cfg = ckpt.config
    engine_kw.setdefault("eos_token_ids", cfg.eos_token_ids)
    engine_kw.setdefault("vocab_size", cfg.vocab_size)
    engine_kw["max_model_len"] = min(engine_kw.get("max_model_len") or cfg.max_position,
                                     cfg.max_position)
    if ckpt.tokenizer is not None and "detokenizer" not in engine_kw:
        engine_kw["detokenizer"] = detokenizer_for(ckpt.tokenizer)
    eng = LLMEngine(runner, spec, **engine_kw)
    eng.arena = arena
    return eng


def detokenizer_for(tok: Any) -> Callable[[list[int]], Any]:
    """prompt ids -> an incremental detokenizer (push / flush) for one request."""
    from .tokenizer import IncrementalDetokenizer

    return lambda prompt: IncrementalDetokenizer(tok, prompt)
