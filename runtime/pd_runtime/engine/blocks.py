"""Block allocation over the KV arena: one free list per KV-cache group, state slots for SSM.

The arena (kvcache.arena_layout) gives every paged group its own `num_blocks` blocks and every
SSM layer `num_state_slots` slots, so each group allocates independently. Sliding-window groups
keep only the blocks that still hold tokens inside the window: the rest are freed and appear as
-1 (the null block) in the block table, exactly as kvcache.make_block_table builds them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..kvcache import (
    GROUP_SLIDING,
    GROUP_STATE,
    ModelSpec,
    blocks_needed,
    groups_of,
    live_token_range,
)
from ..planner import Request

NULL_BLOCK = -1


class OutOfBlocks(RuntimeError):
    """Not enough free blocks or state slots now (the scheduler preempts or waits)."""


class BlockPool:
    def __init__(self, size: int):
        self.size = size
        self._free = list(range(size - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"{n} blocks asked, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, ids: list[int]) -> None:
        self._free.extend(i for i in ids if i != NULL_BLOCK)


@dataclass
class SeqBlocks:
    tables: dict[int, list[int]] = field(default_factory=dict)  # paged group -> block ids
    state_slot: int | None = None
    scratch_slot: int | None = None  # P/D on hybrid-ssm: where P's last prompt token writes


class BlockManager:
    def __init__(self, model: ModelSpec, block_size: int, num_blocks: int, num_state_slots: int = 0):
        self.model, self.block_size = model, block_size
        all_groups = groups_of(model)
        self.groups = [g for g in all_groups if g != GROUP_STATE]
        self.has_state = GROUP_STATE in all_groups
        self.pools = {g: BlockPool(num_blocks) for g in self.groups}
        self.slots = BlockPool(num_state_slots if self.has_state else 0)
        self.seqs: dict[str, SeqBlocks] = {}

    def _first_live(self, group: int, computed: int) -> int:
        """First block index that may still be read when computing from token `computed` on."""
        lo, _ = live_token_range(self.model, group, computed)
        return lo // self.block_size if group == GROUP_SLIDING else 0

    def _new_blocks(self, sb: SeqBlocks, group: int, num_tokens: int, computed: int) -> int:
        have = len(sb.tables.get(group, []))
        want = blocks_needed(num_tokens, self.block_size)
        first = self._first_live(group, computed)
        return max(0, want - max(have, first))

    def can_grow(self, seq_id: str, num_tokens: int, computed: int, scratch: bool = False) -> bool:
        sb = self.seqs.get(seq_id) or SeqBlocks()
        self._trim(sb, computed)
        slots = self.has_state * ((sb.state_slot is None) + (scratch and sb.scratch_slot is None))
        if slots > self.slots.num_free:
            return False
        return all(self._new_blocks(sb, g, num_tokens, computed) <= self.pools[g].num_free
                   for g in self.groups)

    def grow(self, seq_id: str, num_tokens: int, computed: int, scratch: bool = False) -> SeqBlocks:
        """Cover `num_tokens` tokens; `computed` tokens are already in the cache (window trim).
        `scratch`: also a second state slot (hybrid-ssm prefill for a decode engine)."""
        if not self.can_grow(seq_id, num_tokens, computed, scratch):
            raise OutOfBlocks(f"no room to grow {seq_id} to {num_tokens} tokens")
        sb = self.seqs.setdefault(seq_id, SeqBlocks())
        if self.has_state and sb.state_slot is None:
            sb.state_slot = self.slots.alloc(1)[0]
        if self.has_state and scratch and sb.scratch_slot is None:
            sb.scratch_slot = self.slots.alloc(1)[0]
        for g in self.groups:
            table = sb.tables.setdefault(g, [])
            first = self._first_live(g, computed)
            want = blocks_needed(num_tokens, self.block_size)
            while len(table) < min(first, want):
                table.append(NULL_BLOCK)
            if want > len(table):
                table.extend(self.pools[g].alloc(want - len(table)))
        return sb

    def _trim(self, sb: SeqBlocks, computed: int) -> None:
        for g, table in sb.tables.items():
            for i in range(min(self._first_live(g, computed), len(table))):
                if table[i] != NULL_BLOCK:
                    self.pools[g].free([table[i]])
                    table[i] = NULL_BLOCK

    def free(self, seq_id: str) -> None:
        sb = self.seqs.pop(seq_id, None)
        if sb is None:
            return
        for g, table in sb.tables.items():
            self.pools[g].free(table)
        self.slots.free([x for x in (sb.state_slot, sb.scratch_slot) if x is not None])

    def tables(self, seq_id: str) -> dict[int, list[int]]:
        return {g: list(t) for g, t in self.seqs[seq_id].tables.items()}

    def state_slot(self, seq_id: str) -> int | None:
        return self.seqs[seq_id].state_slot

    def scratch_slot(self, seq_id: str) -> int | None:
        return self.seqs[seq_id].scratch_slot

    def drop_scratch(self, seq_id: str) -> None:
        sb = self.seqs[seq_id]
        if sb.scratch_slot is not None:
            self.slots.free([sb.scratch_slot])
            sb.scratch_slot = None

    def transfer_request(self, seq_id: str, num_tokens: int) -> Request:
        """The planner's view of the first `num_tokens` tokens: tables exactly as
        kvcache.make_block_table builds them (live blocks only, -1 before the window).
        Blocks past the end stay allocated here and are not part of the transfer."""
        self._trim(self.seqs[seq_id], num_tokens)
        sb = self.seqs[seq_id]
        n = blocks_needed(num_tokens, self.block_size)
        tables = {g: list(t[:n]) for g, t in sb.tables.items()}
        if sb.state_slot is not None:
            tables[GROUP_STATE] = [sb.state_slot]
        return Request(num_tokens, tables)

    def usage(self) -> float:
        """Fraction of blocks in use (the most loaded group)."""
        fr = [1 - p.num_free / p.size for p in self.pools.values() if p.size]
        return max(fr, default=0.0)
