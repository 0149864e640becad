"""CUDA graphs of all-decode steps: one capture per (batch bucket, block-table width bucket).

An eager decode step of an 8B model is ~1,300 small launches (launch-bound at ~30 ms on an
H200); a graph replays them in one call. With kernels.paged_decode no tensor shape depends on
the context length, so a step's shapes are fixed by the padded batch size and the block-table
width; both are rounded up to powers of two, a few captures serve a whole run.

Per step the host fills one pinned int64 buffer (token ids, positions, and per (KV group,
window) the write slots, key counts and block tables), copies it with one upload into the
graph's static input and replays. Rows past the real batch repeat row 0 (same token, position,
table and write slot): they write row 0's own values to row 0's own slot, and are dropped.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .. import kvcache
from ..kernels.paged_decode import split_plan
from .model import AttnMeta, PagedMeta

if TYPE_CHECKING:
    from .runner import ModelRunner, SeqChunk

MAX_GRAPH_BATCH = 64
MIN_WIDTH = 16  # blocks


def _pow2(n: int, lo: int) -> int:
    return max(lo, 1 << max(0, n - 1).bit_length())


@dataclass
class _Graph:
    bb: int  # padded batch
    width: int  # block-table width
    keys: list[tuple[int, int]]
    dev_buf: torch.Tensor  # int64, the static input
    host_buf: torch.Tensor  # pinned twin
    metas: dict[tuple[int, int], AttnMeta]
    graph: torch.cuda.CUDAGraph | None = None
    out: torch.Tensor | None = None  # [bb, vocab] float32 logits (static)
    uploaded: torch.cuda.Event | None = None

    def size(self) -> int:
        return 2 * self.bb + len(self.keys) * (3 * self.bb + self.bb * self.width)


class DecodeGraphs:
    def __init__(self, runner: ModelRunner):
        self.r = runner
        self.keys = sorted({k for k in runner.keys if k[0] != kvcache.GROUP_STATE})
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.captures = 0

    def fits(self, batch: list[SeqChunk]) -> bool:
        """An all-decode batch a graph can take (size bound; own block never null)."""
        if len(batch) > MAX_GRAPH_BATCH:
            return False
        bs = self.r.kv.block_size
        for c in batch:
            for g, _ in self.keys:
                t = c.block_tables.get(g)
                if t is None or len(t) <= c.start_pos // bs or t[c.start_pos // bs] < 0:
                    return False  # the eager path names the error / keeps the legacy semantics
        return True

    def run(self, batch: list[SeqChunk]) -> torch.Tensor:
        from .runner import _table

        bs, nb = self.r.kv.block_size, self.r.kv.num_blocks
        tables = {}
        for g, w in self.keys:  # validated as the eager path validates (same errors)
            rows = []
            for c in batch:
                t = _table(c, g, c.start_pos + 1, bs, nb)
                lo = max(0, c.start_pos - w + 1) if w else 0
                if bool((t[lo // bs :] < 0).any()):
                    from .kv import KVCacheError

                    raise KVCacheError(
                        f"group {g}: a null block holds keys position {c.start_pos} attends to"
                    )
                rows.append(t)
            tables[(g, w)] = rows
        width = max(len(t) for rows in tables.values() for t in rows)
        key = (_pow2(len(batch), 1), _pow2(width, MIN_WIDTH))
        gr = self.graphs.get(key)
        if gr is None:
            gr = self._new(*key)
        self._fill(gr, batch, tables)
        if gr.graph is None:
            self._capture(gr)
        else:
            assert gr.graph is not None
            gr.graph.replay()
        assert gr.out is not None
        return gr.out[: len(batch)].clone()

    def _new(self, bb: int, width: int) -> _Graph:
        dev = self.r.device
        n = 2 * bb + len(self.keys) * (3 * bb + bb * width)
        dev_buf = torch.zeros(n, dtype=torch.long, device=dev)
        host = torch.zeros(n, dtype=torch.long).pin_memory()
        gr = _Graph(bb, width, self.keys, dev_buf, host, {})
        at = 2 * bb
        sel = torch.arange(bb, device=dev)
        heads = self.r._kv_heads()
        splits, tps = split_plan(bb, heads, width * self.r.kv.block_size)
        empty = torch.zeros((0, 0), dtype=torch.long, device=dev)
        for _g, w in self.keys:
            wblk, woff, lens = (dev_buf[at + i * bb : at + (i + 1) * bb] for i in range(3))
            table = dev_buf[at + 3 * bb : at + 3 * bb + bb * width].view(bb, width)
            at += 3 * bb + bb * width
            gr.metas[(_g, w)] = AttnMeta(
                empty, torch.zeros(0, dtype=torch.long, device=dev), empty, empty, sel, wblk,
                woff, None,
                paged=PagedMeta(None, table, lens, w, splits, tps),
            )
        self.graphs[(bb, width)] = gr
        return gr

    def _fill(
        self, gr: _Graph, batch: list[SeqChunk], tables: dict[tuple[int, int], list[torch.Tensor]]
    ) -> None:
        if gr.uploaded is not None:
            gr.uploaded.synchronize()  # the last upload from this buffer has left it
        h = gr.host_buf.numpy()
        bb, n, bs = gr.bb, len(batch), self.r.kv.block_size
        h[:bb] = [c.token_ids[0] for c in batch] + [batch[0].token_ids[0]] * (bb - n)
        pos = [c.start_pos for c in batch]
        h[bb : 2 * bb] = pos + [pos[0]] * (bb - n)
        at = 2 * bb
        for k in self.keys:
            rows = tables[k]
            blk = [int(t[p // bs]) for t, p in zip(rows, pos, strict=True)]
            h[at : at + bb] = blk + [blk[0]] * (bb - n)
            h[at + bb : at + 2 * bb] = [p % bs for p in pos] + [pos[0] % bs] * (bb - n)
            h[at + 2 * bb : at + 3 * bb] = [p + 1 for p in pos] + [pos[0] + 1] * (bb - n)
            tab = h[at + 3 * bb : at + 3 * bb + bb * gr.width].reshape(bb, gr.width)
            for i in range(bb):
                t = rows[i if i < n else 0]
                tab[i, : len(t)] = t.clamp(min=0).numpy()
            at += 3 * bb + bb * gr.width
        gr.dev_buf.copy_(gr.host_buf, non_blocking=True)
        if gr.uploaded is None:
            gr.uploaded = torch.cuda.Event()
        gr.uploaded.record()

    def _forward(self, gr: _Graph) -> torch.Tensor:
        m = self.r.model
        ids, pos = gr.dev_buf[: gr.bb], gr.dev_buf[gr.bb : 2 * gr.bb]
        h = m.forward(ids, pos, [gr.metas[k] for k in self.r.keys], self.r.kv)
        return m.logits(h)

    def _capture(self, gr: _Graph) -> None:
        """Warm up (compiles the kernels, writes this step's KV, gives this step's logits),
        then capture: the first step of a bucket runs eagerly, later ones replay."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            warm = self._forward(gr)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        # thread_local: D's pull thread may launch its scatter and synchronize while the engine
        # thread captures (its work goes to other streams and is not part of the graph).
        # No garbage collection inside the capture (torch.cuda.graph collects just before it):
        # a finalizer run on this thread mid-capture may make a CUDA call that capture forbids,
        # which aborts the process (seen on an H200 in a long GPU test session).
        gc_was_on = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.graph(g, pool=self.pool, capture_error_mode="thread_local"):
                gr.out = self._forward(gr)
        finally:
            if gc_was_on:
                gc.enable()
        gr.graph = g
        gr.out.copy_(warm)
        self.captures += 1
