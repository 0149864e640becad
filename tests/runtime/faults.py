"""Test-only fault injection for the runtime's transfer path. The product classes carry no test
hooks: faults come from transports that misbehave and from wrapping a rank's side-channel
handler, here."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict
from typing import Any

from pd_runtime.protocol import PatternReply, PrepareReply
from pd_runtime.selftest import Cell, build_prefill
from pd_runtime.transport import TransferError, Transport
from pd_runtime.worker import PrefillRank

DIED_EXIT_CODE = 17


class SlowReadTransport(Transport):
    """Every READ is posted `delay_s` late (lets a peer die in between)."""

    def __init__(self, name: str, device: str = "cpu", delay_s: float = 0.5):
        super().__init__(name, device)
        self.delay_s = delay_s

    def read(self, peer, local, remote, notif):
        time.sleep(self.delay_s)
        return super().read(peer, local, remote, notif)


class DroppedReadTransport(Transport):
    """The first `drops` READs fail before anything is posted (a decode rank that stalls after
    PREPARE: the prefill side's slot waits for a READ that never comes)."""

    def __init__(self, name: str, device: str = "cpu", drops: int = 1):
        super().__init__(name, device)
        self.drops = drops

    def read(self, peer, local, remote, notif):
        if self.drops > 0:
            self.drops -= 1
            raise TransferError("injected fault: READ dropped")
        return super().read(peer, local, remote, notif)


def die_after_first_prepare(rank: PrefillRank, delay_s: float = 0.05) -> None:
    """The process exits (as if killed) `delay_s` after this rank answers its first PREPARE."""
    inner = rank.server.handler

    def handler(msg: Any, session: Any) -> Any:
        reply = inner(msg, session)
        if isinstance(reply, PrepareReply):
            threading.Timer(delay_s, os._exit, (DIED_EXIT_CODE,)).start()
        return reply

    rank.server.handler = handler


def corrupt_patterns(rank: PrefillRank) -> None:
    """Every KV path check pattern this rank stages has one byte flipped after staging (what a
    wrong address, a stale buffer or a bad link would deliver to the decode side)."""
    inner = rank.server.handler

    def handler(msg: Any, session: Any) -> Any:
        reply = inner(msg, session)
        if isinstance(reply, PatternReply):
            off = reply.addr - rank.staging.data_ptr() + reply.nbytes // 2
            rank.staging[off] = 255 - int(rank.staging[off])
        return reply

    rank.server.handler = handler


def serve_prefill(cell: dict, conn, dies: bool) -> None:
    """Spawn target: P rank 0 of `cell`; sends its address, serves until told to stop."""
    pr = build_prefill(Cell(**cell), 0, "cpu")
    if dies:
        die_after_first_prepare(pr)
    conn.send(list(pr.address))
    try:
        conn.recv()  # "stop", or EOF when the test process goes away
    except EOFError:
        pass
    pr.close()


def cell_dict(cell: Cell) -> dict:
    return asdict(cell)
