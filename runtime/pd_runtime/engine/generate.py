"""Offline greedy generation of one sequence: the reference every equality test compares with."""

from __future__ import annotations

from collections.abc import Collection

import torch

from .. import kvcache
from .checkpoint import Checkpoint
from .kv import KVCache, chunk_block_table
from .runner import ModelRunner, SeqChunk


def generate(
    ckpt: Checkpoint,
    prompt_ids: list[int],
    max_tokens: int,
    *,
    block_size: int = 16,
    layout: str = "HND",
    cache_dtype: str = "auto",
    device: str = "cpu",
    prefill_chunk: int = 0,
    ignore_eos: bool = False,
) -> list[int]:
    """Greedy tokens after `prompt_ids` (at most `max_tokens`; stops after an EOS token unless
    `ignore_eos`). `prefill_chunk` > 0 prefills in chunks of that many tokens."""
    if not prompt_ids:
        raise ValueError("empty prompt")
    if max_tokens < 1:
        return []
    spec = kvcache.RankSpec(
        ckpt.config.model_spec(cache_dtype),
        block_size=block_size,
        layout=layout,
        num_blocks=kvcache.blocks_needed(len(prompt_ids) + max_tokens, block_size),
    )
    runner = ModelRunner(ckpt, KVCache.allocate(spec, device), device)
    eos = () if ignore_eos else ckpt.config.eos_token_ids
    tokens, _ = greedy(runner, prompt_ids, max_tokens, prefill_chunk=prefill_chunk, eos=eos)
    return tokens


def greedy(
    runner: ModelRunner,
    prompt_ids: list[int],
    max_tokens: int,
    *,
    prefill_chunk: int = 0,
    eos: Collection[int] = (),
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding of one sequence on `runner` (any TP rank: every rank calls it with the same
    arguments) from block 0 of each group; the tokens and the logits of each step."""
    spec = runner.kv.spec
    ids = list(range(spec.num_blocks))
    groups = [g for g in kvcache.groups_of(spec.model) if g != kvcache.GROUP_STATE]
    logits: list[torch.Tensor] = []

    def step(tokens: list[int], start: int) -> int:
        tables = {
            g: chunk_block_table(spec.model, g, start, start + len(tokens), spec.block_size, ids)
            for g in groups
        }
        logits.append(runner.execute([SeqChunk(tokens, start, tables, state_slot=0)])[0])
        return int(torch.argmax(logits[-1]))

    chunk = prefill_chunk or len(prompt_ids)
    for start in range(0, len(prompt_ids), chunk):
        tok = step(prompt_ids[start : start + chunk], start)
    out = [tok]
    while len(out) < max_tokens and out[-1] not in eos:
        out.append(step([out[-1]], len(prompt_ids) + len(out) - 1))
    return out, logits


class GenerateCommandError(ValueError):
    """A `pd-runtime generate` invocation that cannot run (says which flag)."""


def prompt_of(
    ckpt: Checkpoint, prompt: str | None, prompt_ids: str | None, chat: bool
) -> list[int]:
    """Token ids for the command line's prompt: explicit ids, or the text (through the chat
    template with --chat, encoded without extra special tokens as vLLM's chat endpoint does)."""
    if prompt_ids:
        try:
            return [int(x) for x in prompt_ids.split(",") if x.strip()]
        except ValueError as e:
            raise GenerateCommandError(f"--prompt-ids: not a comma-separated id list ({e})") from e
    if prompt is None:
        raise GenerateCommandError("give --prompt TEXT or --prompt-ids 1,2,3")
    tok = ckpt.tokenizer
    if tok is None:
        raise GenerateCommandError(f"{ckpt.source} has no tokenizer; use --prompt-ids")
    if chat:
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True
        )
        return list(tok.encode(text, add_special_tokens=False))
    return list(tok.encode(prompt))


def run_generate_command(
    model: str,
    prompt: str | None,
    prompt_ids: str | None,
    max_tokens: int,
    *,
    chat: bool = False,
    dtype: str | None = None,
    block_size: int = 16,
    layout: str = "HND",
    cache_dtype: str = "auto",
    device: str = "cpu",
    ignore_eos: bool = False,
) -> dict:
    """`pd-runtime generate`: load, encode, greedy-generate, decode; a JSON-able result."""
    import time

    from .checkpoint import load_checkpoint

    t0 = time.perf_counter()
    ckpt = load_checkpoint(model, dtype)
    ids = prompt_of(ckpt, prompt, prompt_ids, chat)
    if not ids:
        raise GenerateCommandError("the prompt encodes to no tokens")
    t1 = time.perf_counter()
    out = generate(
        ckpt,
        ids,
        max_tokens,
        block_size=block_size,
        layout=layout,
        cache_dtype=cache_dtype,
        device=device,
        ignore_eos=ignore_eos,
    )
    t2 = time.perf_counter()
    eos = set(ckpt.config.eos_token_ids)
    text = ckpt.tokenizer.decode(out) if ckpt.tokenizer is not None else None
    return {
        "model": model,
        "family": ckpt.config.family,
        "dtype": ckpt.config.dtype,
        "prompt_ids": ids,
        "token_ids": out,
        "text": text,
        "finish_reason": "stop" if out and out[-1] in eos and not ignore_eos else "length",
        "load_s": round(t1 - t0, 3),
        "generate_s": round(t2 - t1, 3),
        "tokens_per_s": round(len(out) / (t2 - t1), 2) if t2 > t1 else None,
    }
