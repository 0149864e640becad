"""Offline greedy generation of one sequence: the reference every equality test compares with."""

from __future__ import annotations

import torch

from .. import kvcache
from .checkpoint import Checkpoint
from .kv import KVCache, chunk_block_table
from .runner import ModelRunner, SeqChunk


def generate(ckpt: Checkpoint, prompt_ids: list[int], max_tokens: int, *, block_size: int = 16,
             layout: str = "HND", cache_dtype: str = "auto", device: str = "cpu",
             prefill_chunk: int = 0, ignore_eos: bool = False) -> list[int]:
    """Greedy tokens after `prompt_ids` (at most `max_tokens`; stops after an EOS token unless
    `ignore_eos`). `prefill_chunk` > 0 prefills in chunks of that many tokens."""
    if not prompt_ids:
        raise ValueError("empty prompt")
    if max_tokens < 1:
        return []
    total = len(prompt_ids) + max_tokens
    spec = kvcache.RankSpec(ckpt.config.model_spec(cache_dtype), block_size=block_size,
                            layout=layout, num_blocks=kvcache.blocks_needed(total, block_size))
    runner = ModelRunner(ckpt, KVCache.allocate(spec, device), device)
    ids = list(range(spec.num_blocks))
    groups = [g for g in kvcache.groups_of(spec.model) if g != kvcache.GROUP_STATE]

    def step(tokens: list[int], start: int) -> int:
        tables = {g: chunk_block_table(spec.model, g, start, start + len(tokens), block_size, ids)
                  for g in groups}
        logits = runner.execute([SeqChunk(tokens, start, tables)])
        return int(torch.argmax(logits[0]))

    chunk = prefill_chunk or len(prompt_ids)
    for start in range(0, len(prompt_ids), chunk):
        tok = step(prompt_ids[start : start + chunk], start)
    out = [tok]
    eos = set() if ignore_eos else set(ckpt.config.eos_token_ids)
    while len(out) < max_tokens and out[-1] not in eos:
        out.append(step([out[-1]], len(prompt_ids) + len(out) - 1))
    return out
