"""The prefill side's lease table: per consumer, bounded, and telling the engine when to free."""

from __future__ import annotations

import pytest

from pd_runtime.lease import CONSUMED, EXPIRED, LeaseError, LeaseTable, consumer_id


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def table():
    clock = Clock()
    events: list[tuple[str, str]] = []
    t = LeaseTable(1 << 20, lease_s=10.0, clock=clock,
                   on_release=lambda r, why: events.append((r, why)), history=8)
    return t, clock, events


A0, A1 = consumer_id("decode-a", 0), consumer_id("decode-a", 1)


def test_one_consumers_ack_cannot_free_what_another_still_reads(table):
    t, _, events = table
    t.hold("r")
    off0 = t.slot("r", A0, 1000, expected=2)
    off1 = t.slot("r", A1, 1000, expected=2)
    assert off0 != off1
    # A0 finishes and claims only one consumer was expected: A1's slot must survive
    assert t.ack("r", A0, expected=1) is False
    assert t.held() == 1 and off1 in t.alloc.used and off0 not in t.alloc.used
    assert events == []
    assert t.ack("r", A1, expected=2) is True
    assert t.held() == 0 and t.alloc.in_use() == 0
    assert events == [("r", CONSUMED)]


def test_a_consumer_acking_twice_counts_once(table):
    t, _, events = table
    t.hold("r")
    t.slot("r", A0, 100, expected=2)
    t.slot("r", A1, 100, expected=2)
    assert not t.ack("r", A0) and not t.ack("r", A0)
    assert t.held() == 1
    assert t.ack("r", A1)


def test_ack_with_a_slot_still_held_by_an_unexpected_consumer_waits(table):
    """Even when the count is reached, a consumer that prepared and has not finished keeps the
    lease (its READ may be in flight)."""
    t, _, _ = table
    t.hold("r")
    t.slot("r", A0, 100, expected=1)
    t.slot("r", consumer_id("decode-b", 0), 100, expected=1)  # a second decode instance (a retry)
    assert t.ack("r", A0) is False
    assert t.ack("r", consumer_id("decode-b", 0)) is True


def test_release_only_notifications(table):
    t, _, events = table
    t.hold("r")
    t.handle_notif("decode-a", "REL:r:0:1")
    assert events == [("r", CONSUMED)]
    t.handle_notif("decode-a", "garbage")
    t.handle_notif("decode-a", "r:x:1")
    assert t.bad_notifs == 2


def test_expiry_frees_slots_and_says_why(table):
    t, clock, events = table
    t.hold("r")
    t.slot("r", A0, 1000, expected=1)
    clock.t = 9.0
    t.handle_notif("decode-a", "HB:r,other")  # a heartbeat extends the lease
    clock.t = 15.0
    assert t.expire() == []
    clock.t = 19.5
    assert t.expire() == ["r"]
    assert t.alloc.in_use() == 0 and events == [("r", EXPIRED)]
    with pytest.raises(LeaseError, match="expired"):
        t.slot("r", A0, 10, expected=1)


def test_consumed_request_is_named_as_such(table):
    t, _, _ = table
    t.hold("r")
    t.slot("r", A0, 10, expected=1)
    t.ack("r", A0)
    with pytest.raises(LeaseError, match="already consumed"):
        t.get("r")
    with pytest.raises(LeaseError, match="unknown request"):
        t.get("never-held")


def test_state_is_bounded(table):
    t, clock, events = table
    for i in range(5000):
        rid = f"r{i}"
        t.hold(rid)
        t.slot(rid, A0, 512, expected=1)
        if i % 2:
            t.ack(rid, A0)
        else:
            clock.t += 11.0
            t.expire()
    assert t.held() == 0 and t.alloc.in_use() == 0
    assert len(t.recent) == 8  # the history is capped; the counters keep the totals
    assert (t.consumed, t.expired) == (2500, 2500)
    assert len(events) == 5000


def test_duplicate_hold_is_refused(table):
    t, _, _ = table
    t.hold("r")
    with pytest.raises(LeaseError, match="already held"):
        t.hold("r")


def test_a_failing_callback_does_not_stop_lease_keeping():
    def boom(req_id: str, reason: str) -> None:
        raise RuntimeError("engine bug")

    t = LeaseTable(1 << 16, lease_s=1.0, on_release=boom)
    t.hold("r")
    t.slot("r", A0, 10, expected=1)
    assert t.ack("r", A0) is True
    assert t.held() == 0


# -- slots staged at hold(): gathered before any PREPARE, claimed by the first of their geometry


def test_a_staged_slot_is_claimable_only_once_published(table):
    t, _, _ = table
    t.hold("r")
    off = t.stage("r", "geom-0", 1000, keep_free=0)
    assert off is not None and t.staged_bytes() == 1024
    assert t.claim("r", "geom-0", A0, expected=1) is None  # its gather is not queued yet
    t.publish("r", "geom-0", "gather-done")
    got = t.claim("r", "geom-0", A0, expected=1)
    assert got is not None and (got.off, got.nbytes, got.done) == (off, 1000, "gather-done")
    assert t.staged_bytes() == 0 and t.claims == 1
    assert t.claim("r", "geom-0", A1, expected=1) is None  # claimed once; A1 gathers itself
    assert t.ack("r", A0, expected=1) is True and t.alloc.in_use() == 0


def test_staging_keeps_the_room_asked_for(table):
    t, _, _ = table
    t.hold("r")
    size = t.alloc.size
    assert t.stage("r", "g", size // 2 + 1, keep_free=size // 2) is None
    assert t.alloc.in_use() == 0
    assert t.stage("r", "g", size // 4, keep_free=size // 2) is not None
    assert t.stage("r", "g", 256, keep_free=0) is None  # one per geometry
    assert t.stage("gone", "g", 256, keep_free=0) is None  # not held


def test_unclaimed_staged_slots_go_with_the_lease(table):
    t, clock, events = table
    t.hold("r")
    t.stage("r", "g0", 500, keep_free=0)
    t.stage("r", "g1", 500, keep_free=0)
    t.publish("r", "g0", None)
    t.slot("r", A0, 100, expected=1)  # a consumer of another geometry gathered at PREPARE
    assert t.ack("r", A0, expected=1) is True  # the staged slots do not keep the lease
    assert t.alloc.in_use() == 0 and events == [("r", CONSUMED)]
    t.hold("s")
    t.stage("s", "g0", 500, keep_free=0)
    clock.t = 11.0
    assert t.expire() == ["s"] and t.alloc.in_use() == 0


def test_unstage_gives_the_slot_back(table):
    t, _, _ = table
    t.hold("r")
    t.stage("r", "g", 500, keep_free=0)
    t.unstage("r", "g")
    assert t.alloc.in_use() == 0 and t.claim("r", "g", A0, expected=1) is None
    t.unstage("r", "g")  # nothing left: a no-op


def test_claiming_replaces_the_consumers_earlier_slot(table):
    """A consumer that PREPAREd before (its first attempt gathered at PREPARE) and claims a
    staged slot on retry holds one slot, not two."""
    t, _, _ = table
    t.hold("r")
    first = t.slot("r", A0, 300, expected=1)
    t.stage("r", "g", 300, keep_free=0)
    t.publish("r", "g", None)
    got = t.claim("r", "g", A0, expected=1)
    assert got is not None and got.off != first and list(t.alloc.used) == [got.off]
