"""ModelRunner: one forward step of a batch of sequence chunks over the paged KV cache.

Each `SeqChunk` is a prefill chunk or one decode token of one sequence. The runner flattens the
batch (every layer runs on all tokens at once), builds per (KV group, window) the index tensors
for the cache writes and the padded gathers of cached keys, and returns the logits at each
chunk's last token. Block tables follow kvcache.make_block_table / kv.chunk_block_table: -1 is
the null block, only allowed in sliding groups for blocks before the window.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from .. import kvcache
from .checkpoint import Checkpoint
from .kv import KVCache, KVCacheError
from .model import AttnMeta, Model, PagedMeta
from .ssm import StateChunk

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from .config import ModelConfig


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
        # How decode tokens are attended (CUDA only; CPU always "legacy"): "legacy" = padded
        # gather + SDPA; "paged" = kernels.paged_decode, other chunks unpadded by them;
        # "graph" = paged, and all-decode steps replayed from CUDA graphs where the model allows.
        self.decode_mode = decode_mode_for(device, kv, cfg.family)
        self.key_bucket = key_bucket_for(device)
        self.graphs = None
        if self.decode_mode == "graph" and graphable(self.cfg, tp_size):
            from .decode_graph import DecodeGraphs

            self.graphs = DecodeGraphs(self)

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
        flat_ids = [t for c in batch for t in c.token_ids]
        if min(flat_ids) < 0 or max(flat_ids) >= self.cfg.vocab_size:
            raise RunnerError(f"token id outside the vocabulary of {self.cfg.vocab_size}")
        decode = [] if self.decode_mode == "legacy" else _decode_rows(batch)
        if (
            self.graphs is not None
            and self.decode_mode == "graph"
            and len(decode) == len(batch)
            and self.graphs.fits(batch)
        ):
            return self.graphs.run(batch)
        ids = torch.tensor(flat_ids, device=self.device)
        pos = torch.tensor(
            [c.start_pos + j for c in batch for j in range(len(c.token_ids))], device=self.device
        )
        metas: dict[tuple[int, int], AttnMeta | list[StateChunk]] = {
            k: self._meta(batch, *k, decode)
            for k in set(self.keys)
            if k[0] != kvcache.GROUP_STATE
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

    def _meta(
        self, batch: list[SeqChunk], group: int, window: int, decode: list[int]
    ) -> AttnMeta:
        bs, nb = self.kv.block_size, self.kv.num_blocks
        if decode:
            split = build_split_meta(
                batch, decode, group, window, bs, nb, self.device, self._kv_heads(), self.key_bucket
            )
            if split is not None:
                return split
        return build_meta(batch, group, window, bs, nb, self.device, key_bucket=self.key_bucket)

    def _kv_heads(self) -> int:
        """Programs per sequence and split of the decode kernel (GQA: KV heads; MLA: blocks
        of query heads), for the split plan."""
        from ..kernels.paged_decode import MLA_HEAD_BLOCK

        return len(self.model.kv_heads) or -(-len(self.model.q_heads) // MLA_HEAD_BLOCK)


# CUDA, legacy/SDPA path: cached-key lengths rounded up to a multiple of this (masked) so that SDPA
# sees one shape per bucket (cuDNN builds a graph per new shape). Off by default: GQA decode no
# longer goes through SDPA, and a padded shape can change bf16 rounding of the remaining SDPA
# steps (MLA, prefill chunks); PD_RUNTIME_KEY_BUCKET=256 turns it on (-> 36.7 vs 63.8 ms per
# 8k decode step of the legacy path on an H200, docs/performance.md).
KEY_BUCKET = 0
DECODE_MODES = ("legacy", "paged", "graph")


def key_bucket_for(device: str) -> int:
    """CUDA: PD_RUNTIME_KEY_BUCKET (default KEY_BUCKET; 0 = exact lengths). CPU: 0."""
    if torch.device(device).type != "cuda":
        return 0
    raw = os.environ.get("PD_RUNTIME_KEY_BUCKET", str(KEY_BUCKET))
    if not raw.isdigit():
        raise RunnerError(f"PD_RUNTIME_KEY_BUCKET={raw!r}: expected a whole number")
    return int(raw)


def decode_mode_for(device: str, kv: KVCache, family: str) -> str:
    """The decode path this runner takes: PD_RUNTIME_DECODE (legacy | paged | graph, default
    graph) where the paged kernels apply (CUDA, Triton, unquantized cache), else legacy."""
    from ..kernels.segcopy import triton_available

    want = os.environ.get("PD_RUNTIME_DECODE", "graph")
    if want not in DECODE_MODES:
        raise RunnerError(f"PD_RUNTIME_DECODE={want!r}: expected one of {', '.join(DECODE_MODES)}")
    if not triton_available(device) or kv.spec.model.quantized:
        return "legacy"
    return want


def graphable(cfg: ModelConfig, tp_size: int) -> bool:
    """Decode steps of this model can be captured: one rank, no MoE (its expert loop reads the
    routing on the host), no SSM layers (their state chunks are per-step Python)."""
    ssm = any(cfg.is_ssm_layer(i) for i in range(cfg.num_layers))
    return tp_size == 1 and not cfg.moe_layers and not ssm


def _decode_rows(batch: list[SeqChunk]) -> list[int]:
    return [i for i, c in enumerate(batch) if len(c.token_ids) == 1]


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
    batch: list[SeqChunk],
    group: int,
    window: int,
    bs: int,
    num_blocks: int,
    device: str,
    *,
    key_bucket: int = 0,
) -> AttnMeta:
    """Index tensors and mask of one (group, window) for a step (see AttnMeta). key_bucket > 0:
    the cached-key length is rounded up to a multiple of it (pads masked), so that SDPA sees
    few distinct shapes (cuDNN builds a graph per new shape)."""
    lens = [len(c.token_ids) for c in batch]
    starts = [c.start_pos for c in batch]
    los = [max(0, s - window + 1) if window else 0 for s in starts]
    b, lq, lc = len(batch), max(lens), max(s - lo for s, lo in zip(starts, los, strict=True))
    if key_bucket and lc:
        lc = -(-lc // key_bucket) * key_bucket
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


def build_split_meta(
    batch: list[SeqChunk],
    decode: list[int],
    group: int,
    window: int,
    bs: int,
    num_blocks: int,
    device: str,
    kv_heads: int,
    key_bucket: int = 0,
) -> AttnMeta | None:
    """AttnMeta of a step whose 1-token chunks (`decode`) go to the paged kernel: the SDPA
    fields cover the other chunks only; write_* cover every token. None: a decode token's own
    block is null (the legacy path keeps such a token's keys out of the cache; keep its way)."""
    dec = set(decode)
    flat, offsets = 0, []
    for c in batch:
        offsets.append(flat)
        flat += len(c.token_ids)
    tables, lens, w_blk, w_off = [], [], [], []
    for i in decode:
        c = batch[i]
        s = c.start_pos
        t = _table(c, group, s + 1, bs, num_blocks)
        lo = max(0, s - window + 1) if window else 0
        if bool((t[lo // bs :] < 0).any()):
            if int(t[s // bs]) < 0:
                return None
            raise KVCacheError(f"group {group}: a null block holds keys position {s} attends to")
        tables.append(t)
        lens.append(s + 1)
        w_blk.append(int(t[s // bs]))
        w_off.append(s % bs)
    width = max(len(t) for t in tables)
    table = torch.zeros((len(decode), width), dtype=torch.int32)
    for r, t in enumerate(tables):
        table[r, : len(t)] = t.clamp(min=0)
    from ..kernels.paged_decode import split_plan

    splits, tps = split_plan(len(decode), kv_heads, max(lens))
    dev = torch.device(device)
    rest = [c for i, c in enumerate(batch) if i not in dec]
    sel = torch.tensor([offsets[i] for i in decode], dtype=torch.long)
    blk, off = torch.tensor(w_blk, dtype=torch.long), torch.tensor(w_off, dtype=torch.long)
    if not rest:
        empty = torch.zeros((0, 0), dtype=torch.long, device=dev)
        return AttnMeta(
            empty,
            torch.zeros(0, dtype=torch.long, device=dev),
            empty,
            empty,
            sel.to(dev),
            blk.to(dev),
            off.to(dev),
            None,
            paged=PagedMeta(
                None, table.to(dev), torch.tensor(lens, dtype=torch.int32, device=dev),
                window, splits, tps,
            ),
        )
    sub = build_meta(rest, group, window, bs, num_blocks, device, key_bucket=key_bucket)
    rest_rows = torch.cat(
        [torch.arange(offsets[i], offsets[i] + len(c.token_ids)) for i, c in enumerate(batch)
         if i not in dec]
    )
    # the other chunks' writes, moved from sub-batch to step order, then the decode tokens'
    w_sel = torch.cat((rest_rows.to(dev)[sub.write_sel], sel.to(dev)))
    return replace(
        sub,
        write_sel=w_sel,
        write_blk=torch.cat((sub.write_blk, blk.to(dev))),
        write_off=torch.cat((sub.write_off, off.to(dev))),
        paged=PagedMeta(
            sel.to(dev), table.to(dev), torch.tensor(lens, dtype=torch.int32, device=dev),
            window, splits, tps,
        ),
        sdpa_rows=rest_rows.to(dev),
    )
