"""Prefill-side bookkeeping: staging slots and block leases, per consumer.

P holds a request's KV blocks until every expected consumer has finished, or until the lease
expires. A consumer is one decode rank of one decode agent (`agent/d_rank`). It finishes with a
NIXL notification `<req>:<d_rank>:<expected>` after its READ, or `REL:<req>:<d_rank>:<expected>`
when it reads nothing from this rank (the count comes from the planner on the decode side, as in
vLLM). Heartbeats `HB:<req>,<req>` extend a lease.

Per consumer: a PREPARE gives its consumer a staging slot, and only that consumer's notification
frees that slot. A slot may also be staged before anyone asks (P gathers at hold() for the decode
geometries already connected): it is keyed by that geometry, claimable once published, and the
first PREPARE of that geometry claims it as its own; unclaimed ones go with the lease.

A lease is released when the expected number of consumers have finished and no
other consumer still holds a slot; a notification can raise the expected count, never lower it
below what PREPARE established. Bounded: released leases leave only counters and a short
history (for the error message a late PREPARE gets); nothing outlives its lease.

`on_release(req_id, reason)` runs (outside the table's lock) once per lease: reason `consumed`
or `expired`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

ALIGN = 256
CONSUMED, EXPIRED = "consumed", "expired"
OnRelease = Callable[[str, str], None]


class StagingFull(RuntimeError):
    pass


class LeaseError(RuntimeError):
    pass


def _aligned(nbytes: int) -> int:
    return max(ALIGN, (nbytes + ALIGN - 1) // ALIGN * ALIGN)


class SlotAllocator:
    """First-fit allocator over a registered staging region (offsets in bytes)."""

    def __init__(self, size: int):
        self.size = size
        self.free: list[tuple[int, int]] = [(0, size)]
        self.used: dict[int, int] = {}

    def alloc(self, nbytes: int) -> int:
        n = _aligned(nbytes)
        for i, (off, ln) in enumerate(self.free):
            if ln >= n:
                self.free[i] = (off + n, ln - n)
                if self.free[i][1] == 0:
                    self.free.pop(i)
                self.used[off] = n
                return off
        raise StagingFull(f"staging region full: {nbytes} bytes asked, "
                          f"{self.size - self.in_use()} free")

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
class StagedSlot:
    """A slot gathered before any consumer asked. `done` is the caller's marker of the queued
    gather (a CUDA event; None on the CPU); a slot is claimable only once published."""

    off: int
    nbytes: int
    published: bool = False
    done: Any = None


@dataclass
class Lease:
    req_id: str
    deadline: float
    expected: int = 0  # consumers to wait for; 0 until a PREPARE or a notification says
    done: set[str] = field(default_factory=set)  # consumers that finished
    slots: dict[str, int] = field(default_factory=dict)  # consumer -> staging offset, unfinished
    staged: dict[Hashable, StagedSlot] = field(default_factory=dict)  # geometry -> unclaimed

    def finished(self) -> bool:
        return self.expected > 0 and len(self.done) >= self.expected and not self.slots


def consumer_id(agent: str, d_rank: int) -> str:
    return f"{agent}/{d_rank}"


class LeaseTable:
    def __init__(self, staging_size: int, lease_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, on_release: OnRelease | None = None,
                 history: int = 1024):
        self.alloc = SlotAllocator(staging_size)
        self.lease_s = lease_s
        self.clock = clock
        self.on_release = on_release
        self.leases: dict[str, Lease] = {}
        self.recent: OrderedDict[str, str] = OrderedDict()  # req_id -> reason, newest last
        self.history = history
        self.consumed = 0
        self.expired = 0
        self.claims = 0  # PREPAREs answered with a slot staged at hold()
        self.bad_notifs = 0
        self.lock = threading.RLock()

    # -- the prefill engine's side

    def hold(self, req_id: str) -> Lease:
        """Register a finished prefill whose blocks wait for their consumers."""
        with self.lock:
            if req_id in self.leases:
                raise LeaseError(f"request {req_id!r} is already held")
            self.recent.pop(req_id, None)
            le = Lease(req_id, self.clock() + self.lease_s)
            self.leases[req_id] = le
            return le

    def held(self) -> int:
        with self.lock:
            return len(self.leases)

    # -- PREPARE

    def get(self, req_id: str) -> Lease:
        events: list[tuple[str, str]] = []
        try:
            with self.lock:
                events = self._expire_locked()
                return self._lookup(req_id)
        finally:
            self._notify(events)

    def slot(self, req_id: str, consumer: str, nbytes: int, expected: int) -> int:
        """A staging slot for `consumer` (a new one replaces its old one); `expected` is the
        consumer count the prefill side computed for this request."""
        events: list[tuple[str, str]] = []
        try:
            with self.lock:
                events = self._expire_locked()
                le = self._lookup(req_id)
                self._renew(le, consumer, expected)
                off = self.alloc.alloc(nbytes)
                le.slots[consumer] = off
                return off
        finally:
            self._notify(events)

    # -- staged at hold(): gathered before any PREPARE

    def stage(self, req_id: str, key: Hashable, nbytes: int, keep_free: int) -> int | None:
        """A slot for a gather made before any consumer asked, for the decode geometry `key`;
        None when the request is gone, `key` is staged already, or fewer than `keep_free` bytes
        would stay free (PREPAREs of requests not staged need that room)."""
        with self.lock:
            le = self.leases.get(req_id)
            if le is None or key in le.staged:
                return None
            if self.alloc.size - self.alloc.in_use() - _aligned(nbytes) < keep_free:
                return None
            try:
                off = self.alloc.alloc(nbytes)
            except StagingFull:  # free bytes, but not in one piece
                return None
            le.staged[key] = StagedSlot(off, nbytes)
            return off

    def publish(self, req_id: str, key: Hashable, done: Any) -> None:
        """The staged slot's gather is queued (`done` marks its end): PREPARE may claim it."""
        with self.lock:
            le = self.leases.get(req_id)
            slot = le.staged.get(key) if le is not None else None
            if slot is not None:
                slot.published, slot.done = True, done

    def unstage(self, req_id: str, key: Hashable) -> None:
        """Give an unclaimed staged slot back (its gather could not be queued)."""
        with self.lock:
            le = self.leases.get(req_id)
            slot = le.staged.pop(key, None) if le is not None else None
            if slot is not None:
                self.alloc.release(slot.off)

    def claim(self, req_id: str, key: Hashable, consumer: str, expected: int) -> StagedSlot | None:
        """The published slot staged for `key`, now `consumer`'s (as `slot` would give it);
        None when there is none, and the caller gathers as usual."""
        events: list[tuple[str, str]] = []
        try:
            with self.lock:
                events = self._expire_locked()
                le = self._lookup(req_id)
                staged = le.staged.get(key)
                if staged is None or not staged.published:
                    return None
                del le.staged[key]
                self.claims += 1
                self._renew(le, consumer, expected)
                le.slots[consumer] = staged.off
                return staged
        finally:
            self._notify(events)

    def _renew(self, le: Lease, consumer: str, expected: int) -> None:
        """`consumer` is about to get a slot: the count PREPARE computed, and the consumer's
        earlier slot (a retried PREPARE) back first, so its room is free for the new one."""
        le.expected = max(le.expected, expected)
        if consumer in le.slots:
            self.alloc.release(le.slots.pop(consumer))
        le.done.discard(consumer)

    def staged_bytes(self) -> int:
        with self.lock:
            return sum(_aligned(s.nbytes) for le in self.leases.values()
                       for s in le.staged.values())

    def _lookup(self, req_id: str) -> Lease:
        le = self.leases.get(req_id)
        if le is None:
            why = {EXPIRED: "its lease expired", CONSUMED: "it was already consumed"}
            raise LeaseError(f"request {req_id!r} is not held by this prefill rank: "
                             f"{why.get(self.recent.get(req_id, ''), 'unknown request')}")
        return le

    # -- notifications

    def ack(self, req_id: str, consumer: str, expected: int = 0) -> bool:
        """`consumer` finished; True when that released the request's blocks."""
        with self.lock:
            le = self.leases.get(req_id)
            if le is None:
                return False
            le.expected = max(le.expected, expected)
            off = le.slots.pop(consumer, None)
            if off is not None:
                self.alloc.release(off)
            le.done.add(consumer)
            if not le.finished():
                return False
            self._release(le, CONSUMED)
        self._notify([(req_id, CONSUMED)])
        return True

    def heartbeat(self, req_ids: Iterable[str]) -> None:
        with self.lock:
            for r in req_ids:
                le = self.leases.get(r)
                if le is not None:
                    le.deadline = self.clock() + self.lease_s

    def handle_notif(self, agent: str, msg: str) -> None:
        if msg.startswith("HB:"):
            self.heartbeat(r for r in msg[3:].split(",") if r)
            return
        parts = msg.removeprefix("REL:").split(":")
        if len(parts) != 3 or not (parts[1].isdigit() and parts[2].isdigit()):
            self.bad_notifs += 1
            log.debug("ignoring malformed notification %r from %s", msg[:80], agent)
            return
        self.ack(parts[0], consumer_id(agent, int(parts[1])), int(parts[2]))

    # -- expiry

    def expire(self) -> list[str]:
        with self.lock:
            events = self._expire_locked()
        self._notify(events)
        return [r for r, _ in events]

    def _expire_locked(self) -> list[tuple[str, str]]:
        now = self.clock()
        gone = [le for le in self.leases.values() if le.deadline <= now]
        for le in gone:
            self._release(le, EXPIRED)
        return [(le.req_id, EXPIRED) for le in gone]

    def _release(self, le: Lease, reason: str) -> None:
        for off in [*le.slots.values(), *(s.off for s in le.staged.values())]:
            self.alloc.release(off)
        le.slots.clear()
        le.staged.clear()
        del self.leases[le.req_id]
        self.recent[le.req_id] = reason
        while len(self.recent) > self.history:
            self.recent.popitem(last=False)
        if reason == CONSUMED:
            self.consumed += 1
        else:
            self.expired += 1

    def _notify(self, events: list[tuple[str, str]]) -> None:
        if self.on_release is None:
            return
        for req_id, reason in events:
            try:
                self.on_release(req_id, reason)
            except Exception:  # noqa: BLE001 - the engine's bug must not stop lease keeping
                log.exception("on_release(%r, %r) failed", req_id, reason)
