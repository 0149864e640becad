"""Mamba-2 mixer (Bamba style) over per-request state slots, TP-sharded by SSM head.

A chunk of tokens runs the causal depthwise conv over (previous k - 1 inputs, chunk) and the
SSD recurrence in its quadratic "attention" form per sub-chunk (a loop over sub-chunks of
SUB tokens, never over tokens): y_t = sum_s C_t.B_s exp(cum_t - cum_s) dt_s x_s + C_t.h0
exp(cum_t) + D x_t, and the final state. State lives in the transfer engine's arena
(kv.LayerState); a sequence at start_pos 0 starts from zeros, whatever its slot held.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .. import kvcache
from .kv import LayerState

if TYPE_CHECKING:
    from .model import Model

SUB = 64


class SSMError(ValueError):
    """Weights or TP placement the Mamba-2 mixer cannot use."""


@dataclass
class StateChunk:
    """One sequence's tokens in a step: flat token range and the slots to read / write."""

    flat_start: int
    n: int
    start_pos: int
    src_slot: int  # initial state (ignored at start_pos 0)
    dst_slot: int  # final state


class Mamba2Mixer:
    def __init__(self, model: Model, prefix: str):
        cfg, s = model.cfg, model.sharder
        self.m = model
        h, p, g, n = cfg.ssm_heads, cfg.ssm_head_dim, cfg.ssm_groups, cfg.d_state
        inter = h * p
        self.heads = kvcache.heads_of_rank(h, True, model.tp_size, model.tp_rank)
        if model.tp_size > h:
            raise SSMError(f"TP {model.tp_size} above {h} SSM heads is not supported")
        self.groups = kvcache.heads_of_rank(g, True, model.tp_size, model.tp_rank)
        per_group = h // g
        if any(hh // per_group not in self.groups for hh in self.heads):
            raise SSMError(f"TP rank {model.tp_rank}: SSM heads outside its groups")
        self.group_of_head = torch.tensor(
            [self.groups.index(hh // per_group) for hh in self.heads], device=s.device
        )
        self.global_group_of_head = torch.tensor(
            [hh // per_group for hh in self.heads], device=s.device
        )
        self.p, self.n, self.k = p, n, cfg.conv_kernel
        self.group_size = inter // g
        hx = [hh * p + j for hh in self.heads for j in range(p)]
        gb = [gg * n + j for gg in self.groups for j in range(n)]
        conv_rows = hx + [inter + r for r in gb] + [inter + g * n + r for r in gb]
        in_rows = (
            hx + [inter + r for r in conv_rows] + [2 * inter + 2 * g * n + hh for hh in self.heads]
        )
        self.split = [len(hx), len(conv_rows), len(self.heads)]
        self.conv_split = [len(hx), len(gb), len(gb)]
        self.w_in = s.rows(s.full(prefix + "in_proj.weight"), in_rows)
        b_in = s.opt(prefix + "in_proj.bias")
        self.b_in = b_in[in_rows] if b_in is not None else None
        self.conv_w = s.full(prefix + "conv1d.weight")[conv_rows].float()  # [C, 1, k]
        cb = s.opt(prefix + "conv1d.bias")
        self.conv_b = cb[conv_rows].float() if cb is not None else None
        idx = torch.tensor(self.heads)
        self.dt_bias = s.full(prefix + "dt_bias")[idx].float()
        self.a = -torch.exp(s.full(prefix + "A_log")[idx].float())
        self.d = s.full(prefix + "D")[idx].float()
        self.norm_w = s.full(prefix + "norm.weight")[torch.tensor(hx)]
        self.w_out = s.cols(s.full(prefix + "out_proj.weight"), hx)
        self.b_out = s.opt(prefix + "out_proj.bias")
        self.dt_limit = cfg.time_step_limit
        self.eps = cfg.rms_norm_eps
        self.num_groups = g

    def forward(self, x: torch.Tensor, chunks: list[StateChunk], st: LayerState) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden] (after the row-parallel out_proj)."""
        gate, xbc, dt = F.linear(x, self.w_in, self.b_in).split(self.split, -1)
        ys = torch.empty(x.shape[0], len(self.heads) * self.p, dtype=torch.float32, device=x.device)
        for c in chunks:
            rows = slice(c.flat_start, c.flat_start + c.n)
            ys[rows] = self._sequence(xbc[rows], dt[rows], c, st)
        y = self._gated_norm(ys, gate).to(x.dtype)
        return self.m.row_parallel(y, self.w_out, self.b_out)

    def _sequence(
        self, xbc: torch.Tensor, dt: torch.Tensor, c: StateChunk, st: LayerState
    ) -> torch.Tensor:
        hl, p, n, k = len(self.heads), self.p, self.n, self.k
        fresh = c.start_pos == 0
        if fresh:
            prev = xbc.new_zeros(k - 1, xbc.shape[1])
            h0 = torch.zeros(hl, p, n, dtype=torch.float32, device=xbc.device)
        else:
            s = c.src_slot
            prev = torch.cat(
                (st.conv_x[s].flatten(1), st.conv_b[s].flatten(1), st.conv_c[s].flatten(1)), 1
            ).to(xbc.dtype)
            h0 = st.ssm[s].view(hl, p, n).clone()
        full = torch.cat((prev, xbc))  # [k - 1 + L, C]
        tail = full[-(k - 1) :]
        cx, cb, cc = tail.split(self.conv_split, -1)
        d = c.dst_slot
        st.conv_x[d] = cx.view(k - 1, hl, p).to(st.conv_x.dtype)
        st.conv_b[d] = cb.view(k - 1, len(self.groups), n).to(st.conv_b.dtype)
        st.conv_c[d] = cc.view(k - 1, len(self.groups), n).to(st.conv_c.dtype)
        conv = F.conv1d(full.float().t()[None], self.conv_w, self.conv_b, groups=full.shape[1])
        xs, bs, cs = F.silu(conv[0].t()).split(self.conv_split, -1)
        ln = xs.shape[0]
        bh = bs.view(ln, -1, n)[:, self.group_of_head]  # [L, H, N]
        ch = cs.view(ln, -1, n)[:, self.group_of_head]
        dtv = F.softplus(dt.float() + self.dt_bias).clamp(*self.dt_limit)
        y, h = ssd_scan(xs.view(ln, hl, p), dtv, self.a, bh, ch, self.d, h0)
        st.ssm[d] = h.reshape(hl, p * n)
        return y.reshape(ln, hl * p)

    def _gated_norm(self, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """RMSNorm of y * silu(gate) per group of intermediate_size / n_groups features; a group
        spread over TP ranks gets its sum of squares from all of them (one all_reduce: each rank
        adds its own heads' sums into its groups' slots)."""
        t = y.shape[0]
        hl, p = len(self.heads), self.p
        z = (y * F.silu(gate.float())).view(t, hl, p)
        sq = z.pow(2).sum(-1)  # [T, H_local]
        if self.m.tp_size > 1:
            tot = sq.new_zeros(t, self.num_groups).index_add_(1, self.global_group_of_head, sq)
            tot = self.m.all_reduce(tot)
            var = tot[:, self.global_group_of_head] / self.group_size
        else:
            tot = sq.new_zeros(t, len(self.groups)).index_add_(1, self.group_of_head, sq)
            var = tot[:, self.group_of_head] / self.group_size
        z = z * torch.rsqrt(var + self.eps)[..., None]
        return self.norm_w * z.reshape(t, hl * p).to(self.norm_w.dtype)


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    d: torch.Tensor,
    h0: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [L, H, P], dt [L, H], a [H], b/c [L, H, N], d [H], h0 [H, P, N] (float32) ->
    y [L, H, P] and the final state [H, P, N]."""
    ys = []
    h = h0
    for s0 in range(0, x.shape[0], SUB):
        xs, dts, bs, cs = x[s0 : s0 + SUB], dt[s0 : s0 + SUB], b[s0 : s0 + SUB], c[s0 : s0 + SUB]
        ln = xs.shape[0]
        cum = torch.cumsum(dts * a, 0)  # [l, H]
        causal = torch.ones(ln, ln, dtype=torch.bool, device=x.device).tril()
        seg = (cum[:, None, :] - cum[None, :, :]).masked_fill(~causal[..., None], float("-inf"))
        w = torch.einsum("thn,shn->tsh", cs, bs) * seg.exp() * dts[None]
        y = torch.einsum("tsh,shp->thp", w, xs)
        y = y + torch.einsum("thn,hpn->thp", cs, h) * cum.exp()[..., None]
        ys.append(y + d[None, :, None] * xs)
        to_end = (cum[-1][None] - cum).exp() * dts  # [l, H]
        h = h * cum[-1].exp()[:, None, None] + torch.einsum("sh,shp,shn->hpn", to_end, xs, bs)
    return torch.cat(ys), h
