"""Prefill-side bookkeeping: staging slots and block leases.

P holds a request's KV blocks until every expected consumer has acknowledged (a NIXL
notification `<req>:<d_rank>:<expected>` after its READ, or `REL:<req>:<d_rank>:<expected>` from a
rank that reads nothing; the count comes from the planner on the decode side, as in vLLM), or until the lease expires. Heartbeats `HB:<req>,<req>` extend a lease. Staging slots
are freed with their reader's notification or with the lease. Nothing outlives its lease.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

ALIGN = 256


class StagingFull(RuntimeError):
    pass


class LeaseError(RuntimeError):
    pass


class SlotAllocator:
    """First-fit allocator over a registered staging region (offsets in bytes)."""

    def __init__(self, size: int):
        self.size = size
        self.free: list[tuple[int, int]] = [(0, size)]
        self.used: dict[int, int] = {}

    def alloc(self, nbytes: int) -> int:
        n = max(ALIGN, (nbytes + ALIGN - 1) // ALIGN * ALIGN)
        for i, (off, ln) in enumerate(self.free):
            if ln >= n:
                self.free[i] = (off + n, ln - n)
                if self.free[i][1] == 0:
                    self.free.pop(i)
                self.used[off] = n
                return off
        raise StagingFull(f"staging region full: {nbytes} bytes asked, {self.size - self.in_use()} free")

    def release(self, off: int) -> None:
        n = self.used.pop(off)
        self.free.append((off, n))
        self.free.sort()
        merged: list[tuple[int, int]] = []
        for o, ln in self.free:
            if merged and merged[-1][0] + merged[-1][1] == o:
                merged[-1] = (merged[-1][0], merged[-1][1] + ln)
            else:
                merged.append((o, ln))
        self.free = merged

    def in_use(self) -> int:
        return sum(self.used.values())


@dataclass
class Lease:
    req_id: str
    expected: int
    deadline: float
    acked: set[int] = field(default_factory=set)
    slots: dict[int, int] = field(default_factory=dict)  # d_rank -> staging offset


class LeaseTable:
    def __init__(self, staging_size: int, lease_s: float = 30.0, clock=time.monotonic):
        self.alloc = SlotAllocator(staging_size)
        self.lease_s = lease_s
        self.clock = clock
        self.leases: dict[str, Lease] = {}
        self.expired: list[str] = []
        self.completed: list[str] = []
        self.lock = threading.RLock()

    def hold(self, req_id: str, expected: int = 0) -> Lease:
        """Register a finished prefill whose blocks wait for `expected` consumers."""
        with self.lock:
            le = Lease(req_id, expected, self.clock() + self.lease_s)
            self.leases[req_id] = le
            return le

    def get(self, req_id: str) -> Lease:
        with self.lock:
            self.expire()
            le = self.leases.get(req_id)
            if le is None:
                why = "its lease expired" if req_id in self.expired else "unknown request"
                raise LeaseError(f"request {req_id!r} is not held by this prefill rank: {why}")
            return le

    def slot(self, req_id: str, d_rank: int, nbytes: int) -> int:
        with self.lock:
            le = self.get(req_id)
            if d_rank in le.slots:
                self.alloc.release(le.slots.pop(d_rank))
            off = self.alloc.alloc(nbytes)
            le.slots[d_rank] = off
            return off

    def ack(self, req_id: str, d_rank: int, expected: int = 0) -> bool:
        """A consumer finished; True when the request's blocks were freed by it."""
        with self.lock:
            le = self.leases.get(req_id)
            if le is None:
                return False
            if expected:
                le.expected = expected
            if d_rank in le.slots:
                self.alloc.release(le.slots.pop(d_rank))
            le.acked.add(d_rank)
            if le.expected and len(le.acked) >= le.expected:
                self._drop(le)
                self.completed.append(req_id)
                return True
            return False

    def heartbeat(self, req_ids: list[str]) -> None:
        with self.lock:
            for r in req_ids:
                if r in self.leases:
                    self.leases[r].deadline = self.clock() + self.lease_s

    def expire(self) -> list[str]:
        with self.lock:
            now = self.clock()
            gone = [le for le in self.leases.values() if le.deadline <= now]
            for le in gone:
                self._drop(le)
                self.expired.append(le.req_id)
            return [le.req_id for le in gone]

    def _drop(self, le: Lease) -> None:
        for off in le.slots.values():
            self.alloc.release(off)
        le.slots.clear()
        self.leases.pop(le.req_id, None)

    def handle_notif(self, msg: str) -> None:
        if msg.startswith("HB:"):
            self.heartbeat([r for r in msg[3:].split(",") if r])
            return
        if msg.startswith("REL:"):
            msg = msg[4:]
        parts = msg.split(":")
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            self.ack(parts[0], int(parts[1]), int(parts[2]))

    def held(self) -> int:
        with self.lock:
            return len(self.leases)
