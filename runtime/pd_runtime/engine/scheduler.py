"""Continuous batching with chunked prefill, over a token budget per step.

Every sequence is "tokens whose KV is cached" (`num_computed`) followed by tokens still to
compute: the prompt (prefill), the last sampled token (decode), or everything again after a
preemption (recompute). One rule schedules all three: take up to the budget from the tokens
still to compute; a chunk that reaches the end of the sequence produces logits to sample from.

Order per step: running sequences first (FCFS), each gets its chunk or, when blocks run out,
the most recently admitted running sequence is preempted (blocks freed, recomputed later);
then waiting sequences join while budget, sequence slots and blocks allow (admission control).
A decode-side P/D request is admitted to `pulling` with blocks for its whole prompt: the engine
pulls the first T - 1 tokens (in the background where the transfer side allows it, so running
requests keep decoding), then `pull_done` moves it to `running` to compute the last prompt token.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from .blocks import BlockManager
from .sampling import SamplingParams, TextStream, make_generator


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    key: str  # unique per sequence (block ownership); request ids may repeat after finishing
    prompt_ids: list[int]
    params: SamplingParams
    text: TextStream
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    status: Status = Status.WAITING
    finish_reason: str | None = None
    arrival: float = field(default_factory=time.monotonic)
    remote_decode: bool = False  # P side: keep the prompt's KV for a decode engine
    remote_prefill: Any = None  # D side: the validated kv_transfer_params to pull from
    pulled: bool = False
    num_preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token(self, i: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.output_ids[i - n]

    def tokens(self, start: int, end: int) -> list[int]:
        return [self.token(i) for i in range(start, end)]

    @property
    def needs_pull(self) -> bool:
        return self.remote_prefill is not None and not self.pulled


def new_sequence(request_id: str, key: str, prompt_ids: list[int], params: SamplingParams,
                 detok: Any) -> Sequence:
    return Sequence(request_id, key, list(prompt_ids), params, TextStream(detok, params.stop),
                    make_generator(params.seed))


@dataclass
class ScheduledChunk:
    seq: Sequence
    start: int
    num_tokens: int

    @property
    def samples(self) -> bool:
        """The chunk reaches the end of the sequence: its last logits give the next token."""
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    pulls: list[tuple[Sequence, int]] = field(default_factory=list)  # (seq, tokens to pull)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.pulling: list[Sequence] = []  # admitted, blocks allocated, KV being pulled
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.pulling)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues (finished or aborted); its blocks are the caller's."""
        for q in (self.running, self.pulling):
            if seq in q:
                q.remove(seq)
                return
        if seq in self.waiting:
            self.waiting.remove(seq)

    def pull_done(self, seq: Sequence, num_tokens: int) -> None:
        """The pulled KV is in place: the sequence computes from `num_tokens` on."""
        self.pulling.remove(seq)
        seq.pulled = True
        seq.num_computed = num_tokens
        self.running.append(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = self._chunk_len(seq, budget)
            if not self._make_room(seq, seq.num_computed + n, out):
                break  # seq itself was preempted (it was the last one)
            self.blocks.grow(seq.key, seq.num_computed + n, seq.num_computed,
                             self._scratch(seq))
            out.chunks.append(ScheduledChunk(seq, seq.num_computed, n))
            budget -= n
            i += 1
        if out.preempted:
            return out  # memory is tight: admit nothing new this step
        while (self.waiting and budget > 0
               and len(self.running) + len(self.pulling) < self.max_num_seqs):
            seq = self.waiting[0]
            pull = seq.remote_prefill.remote_num_tokens if seq.needs_pull else 0
            if pull:  # blocks for the whole prompt; no compute this step
                if not self.blocks.can_grow(seq.key, seq.num_tokens, pull):
                    break
                self.blocks.grow(seq.key, seq.num_tokens, pull)
                self.waiting.popleft()
                seq.status = Status.RUNNING
                self.pulling.append(seq)
                out.pulls.append((seq, pull))
                continue
            n = self._chunk_len(seq, budget)
            scratch = self._scratch(seq)
            if not self.blocks.can_grow(seq.key, seq.num_computed + n, seq.num_computed, scratch):
                break  # admission control: wait for blocks (FCFS, no overtaking)
            self.blocks.grow(seq.key, seq.num_computed + n, seq.num_computed, scratch)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.chunks.append(ScheduledChunk(seq, seq.num_computed, n))
            budget -= n
        return out

    def _scratch(self, seq: Sequence) -> bool:
        """P/D on hybrid-ssm: P's last prompt token reads the state of T - 1 tokens and writes
        to a scratch slot, so the live slot keeps exactly what D pulls."""
        return seq.remote_decode and self.blocks.has_state

    def _chunk_len(self, seq: Sequence, budget: int) -> int:
        n = min(seq.num_tokens - seq.num_computed, budget)
        last = len(seq.prompt_ids) - 1
        if self._scratch(seq) and seq.num_computed < last:
            n = min(n, last - seq.num_computed)  # the last prompt token goes alone
        return n

    def _make_room(self, seq: Sequence, num_tokens: int, out: SchedulerOutput) -> bool:
        """Preempt from the back of the running queue until `seq` can grow; False if `seq` went."""
        while not self.blocks.can_grow(seq.key, num_tokens, seq.num_computed, self._scratch(seq)):
            victim = self.running[-1]
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.key)
        seq.num_computed = 0
        seq.pulled = True  # recompute locally from here on: the pulled KV is gone
        seq.remote_prefill = None
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
