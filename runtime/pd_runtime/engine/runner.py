"""ModelRunner: one forward step of a batch of sequence chunks over the paged KV cache.

Each `SeqChunk` is a prefill chunk or one decode token of one sequence. The runner flattens the
batch (every layer runs on all tokens at once), builds per (KV group, window) the index tensors
for the cache writes and the padded gathers of cached keys, and returns the logits at each
chunk's last token. Block tables follow kvcache.make_block_table / kv.chunk_block_table: -1 is
the null block, only allowed in sliding groups for blocks before the window.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .. import kvcache
from .checkpoint import Checkpoint
from .kv import KVCache, KVCacheError
from .model import AttnMeta, Model
from .ssm import StateChunk

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


class RunnerError(ValueError):
    """A batch the runner refuses (empty chunk, short block table, cache mismatch)."""


@dataclass
class SeqChunk:
    token_ids: list[int]  # the tokens computed in this step (prefill chunk, or 1 decode token)
    start_pos: int  # tokens of this sequence already in the cache
    block_tables: dict[int, list[int]] = field(default_factory=dict)  # group -> block ids
    state_slot: int | None = (
        None  # hybrid-ssm: the state slot (default: block_tables[GROUP_STATE][0])
    )
    state_src_slot: int | None = None  # hybrid-ssm: read the initial state here instead (P/D)


class ModelRunner:
    def __init__(
        self,
        ckpt: Checkpoint,
        kv: KVCache,
        device: str,
        tp_rank: int = 0,
        tp_size: int = 1,
        group: ProcessGroup | None = None,
    ):
        cfg = ckpt.config
        spec = kv.spec
        want = cfg.model_spec(spec.model.cache_dtype)
        if spec.model != want:
            raise RunnerError(f"KV cache geometry {spec.model} does not match the model's {want}")
        if (spec.tp_rank, spec.tp_size) != (tp_rank, tp_size):
            raise RunnerError(
                f"KV cache is for TP rank {spec.tp_rank}/{spec.tp_size}, "
                f"runner is {tp_rank}/{tp_size}"
            )
        self.cfg, self.kv, self.device = cfg, kv, device
        self.model = Model(cfg, ckpt.weights, device, tp_rank, tp_size, group)
        self.keys = [(cfg.kv_group_of(i), cfg.window_of(i)) for i in range(cfg.num_layers)]

    @torch.inference_mode()
    def execute(self, batch: list[SeqChunk]) -> torch.Tensor:
        """float32 logits [len(batch), vocab] at each chunk's last token."""
        if not batch:
            raise RunnerError("empty batch")
        for c in batch:
            if not c.token_ids:
                raise RunnerError("a chunk with no tokens")
            if c.start_pos < 0:
                raise RunnerError("start_pos must be >= 0")
            if c.start_pos + len(c.token_ids) > self.cfg.max_position:
                raise RunnerError(
                    f"position {c.start_pos + len(c.token_ids)} beyond the model's "
                    f"{self.cfg.max_position}"
                )
        ids = torch.tensor([t for c in batch for t in c.token_ids], device=self.device)
        if int(ids.min()) < 0 or int(ids.max()) >= self.cfg.vocab_size:
            raise RunnerError(f"token id outside the vocabulary of {self.cfg.vocab_size}")
        pos = torch.tensor(
            [c.start_pos + j for c in batch for j in range(len(c.token_ids))], device=self.device
        )
        metas: dict[tuple[int, int], AttnMeta | list[StateChunk]] = {
            k: self._meta(batch, *k) for k in set(self.keys) if k[0] != kvcache.GROUP_STATE
        }
        if (kvcache.GROUP_STATE, 0) in self.keys:
            metas[(kvcache.GROUP_STATE, 0)] = self._state_chunks(batch)
        h = self.model.forward(ids, pos, [metas[k] for k in self.keys], self.kv)
        last = torch.tensor(_last_indices(batch), device=self.device)
        return self.model.logits(h[last])

    def _state_chunks(self, batch: list[SeqChunk]) -> list[StateChunk]:
        out, flat = [], 0
        slots = self.kv.num_state_slots
        for c in batch:
            dst = c.state_slot
            if dst is None:
                table = c.block_tables.get(kvcache.GROUP_STATE)
                if not table:
                    raise RunnerError(
                        "hybrid-ssm: a chunk needs state_slot (or a GROUP_STATE table)"
                    )
                dst = table[0]
            src = dst if c.state_src_slot is None else c.state_src_slot
            if not (0 <= dst < slots and 0 <= src < slots):
                raise RunnerError(f"state slot outside 0..{slots - 1}")
            out.append(StateChunk(flat, len(c.token_ids), c.start_pos, src, dst))
            flat += len(c.token_ids)
        return out

    def _meta(self, batch: list[SeqChunk], group: int, window: int) -> AttnMeta:
        return build_meta(batch, group, window, self.kv.block_size, self.kv.num_blocks, self.device)


def _last_indices(batch: list[SeqChunk]) -> list[int]:
    out, n = [], 0
    for c in batch:
        n += len(c.token_ids)
        out.append(n - 1)
    return out


def _table(c: SeqChunk, group: int, end: int, bs: int, num_blocks: int) -> torch.Tensor:
    table = c.block_tables.get(group)
    need = kvcache.blocks_needed(end, bs)
    if table is None or len(table) < need:
        raise RunnerError(
            f"block table of group {group} covers {0 if table is None else len(table)} "
            f"blocks, {end} tokens need {need}"
        )
    t = torch.tensor(table[:need], dtype=torch.long)
    if int(t.max()) >= num_blocks or int(t.min()) < -1:
        raise RunnerError(f"block id outside 0..{num_blocks - 1} in group {group}")
    return t


def build_meta(
    batch: list[SeqChunk], group: int, window: int, bs: int, num_blocks: int, device: str
) -> AttnMeta:
    """Index tensors and mask of one (group, window) for a step (see AttnMeta)."""
    lens = [len(c.token_ids) for c in batch]
    starts = [c.start_pos for c in batch]
    los = [max(0, s - window + 1) if window else 0 for s in starts]
    b, lq, lc = len(batch), max(lens), max(s - lo for s, lo in zip(starts, los, strict=True))
    total = sum(lens)
    q_index = torch.zeros((b, lq), dtype=torch.long)  # pads read token 0: masked / discarded
    cache_blk = torch.zeros((b, lc), dtype=torch.long)
    cache_off = torch.zeros((b, lc), dtype=torch.long)
    out_index = torch.empty(total, dtype=torch.long)
    w_sel, w_blk, w_off = [], [], []
    flat = 0
    for i, c in enumerate(batch):
        n, s, lo = lens[i], starts[i], los[i]
        table = _table(c, group, s + n, bs, num_blocks)
        q_index[i, :n] = torch.arange(flat, flat + n)
        out_index[flat : flat + n] = torch.arange(i * lq, i * lq + n)
        if s > lo:
            kp = torch.arange(lo, s)
            blk = table[kp // bs]
            if bool((blk < 0).any()):
                raise KVCacheError(
                    f"group {group}: a null block holds keys position {s} attends to"
                )
            cache_blk[i, : s - lo], cache_off[i, : s - lo] = blk, kp % bs
        wp = torch.arange(s, s + n)
        wb = table[wp // bs]
        keep = wb >= 0
        w_sel.append(torch.arange(flat, flat + n)[keep])
        w_blk.append(wb[keep])
        w_off.append((wp % bs)[keep])
        flat += n
    mask = None
    if not (b == 1 and starts[0] == 0 and (window == 0 or window >= lens[0])):
        mask = _mask(lens, starts, los, lq, lc, window)
    dev = torch.device(device)
    return AttnMeta(
        q_index.to(dev),
        out_index.to(dev),
        cache_blk.to(dev),
        cache_off.to(dev),
        torch.cat(w_sel).to(dev),
        torch.cat(w_blk).to(dev),
        torch.cat(w_off).to(dev),
        None if mask is None else mask.to(dev),
    )


def _mask(
    lens: list[int], starts: list[int], los: list[int], lq: int, lc: int, window: int
) -> torch.Tensor:
    n = torch.tensor(lens)[:, None]
    s = torch.tensor(starts)[:, None]
    lo = torch.tensor(los)[:, None]
    qpos = s + torch.arange(lq)[None, :]  # [B, Lq]
    kpos = torch.cat((lo + torch.arange(lc)[None, :], s + torch.arange(lq)[None, :]), 1)
    kvalid = torch.cat((torch.arange(lc)[None, :] < s - lo, torch.arange(lq)[None, :] < n), 1)
    m = kvalid[:, None, :] & (kpos[:, None, :] <= qpos[:, :, None])
    if window:
        m &= kpos[:, None, :] > qpos[:, :, None] - window
    m |= (torch.arange(lq)[None, :] >= n)[:, :, None]  # padded query rows: anything, discarded
    return m[:, None]
