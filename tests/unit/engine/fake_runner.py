"""A model-free runner for scheduler tests that still checks the block tables.

It keeps a token-id "KV cache" per group ([num_blocks, block_size]) written and read through
the block tables it is given, and its logits depend on every cached token the chunk's last
position can see (all of them, or the window for sliding groups). A wrong, shared or stale
block therefore changes the tokens, exactly as it would with a real model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pd_runtime import kvcache

VOCAB = 64


@dataclass
class Chunk:
    token_ids: list[int]
    start_pos: int
    block_tables: dict[int, list[int]] = field(default_factory=dict)
    state_slot: int | None = None


def next_token(tokens: list[int], window: int = 0) -> int:
    """The reference: what the fake model predicts after `tokens`."""
    seen = tokens[-window:] if window else tokens
    h = 0
    for i, t in enumerate(seen):
        h = (h * 31 + t * (i + 7)) % 1_000_003
    return h % VOCAB


class FakeRunner:
    def __init__(self, spec: kvcache.RankSpec, vocab: int = VOCAB):
        self.spec, self.vocab = spec, vocab
        self.groups = [g for g in kvcache.groups_of(spec.model) if g != kvcache.GROUP_STATE]
        self.cache = {g: torch.full((spec.num_blocks, spec.block_size), -1, dtype=torch.long)
                      for g in self.groups}
        self.batches: list[list[Chunk]] = []

    def execute(self, batch: list) -> torch.Tensor:
        self.batches.append(batch)
        out = torch.full((len(batch), self.vocab), -10.0)
        bs = self.spec.block_size
        for i, c in enumerate(batch):
            end = c.start_pos + len(c.token_ids)
            for g in self.groups:
                table = c.block_tables[g]
                for j, t in enumerate(c.token_ids):
                    p = c.start_pos + j
                    self.cache[g][table[p // bs], p % bs] = t
            g = self.groups[-1]  # the sliding group when there is one
            win = self.spec.model.sliding_window if g == kvcache.GROUP_SLIDING else 0
            lo = max(0, end - win) if win else 0
            table = c.block_tables[g]
            seen = [int(self.cache[g][table[p // bs], p % bs]) for p in range(lo, end)]
            if any(table[p // bs] < 0 for p in range(lo, end)):
                raise AssertionError("read through a null block")
            tok = next_token(seen)
            out[i, tok] = 10.0
            out[i, (tok + 1) % self.vocab] = 9.0  # a runner-up, for sampling tests
        return out


def reference(prompt: list[int], n: int, window: int = 0, eos: int | None = None) -> list[int]:
    toks, out = list(prompt), []
    for _ in range(n):
        t = next_token(toks[-window:] if window else toks)
        out.append(t)
        toks.append(t)
        if t == eos:
            break
    return out
