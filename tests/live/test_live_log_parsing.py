"""How the live tier reads D's log for handshake outcomes (no vLLM needed): vLLM 0.32 logs
"compatibility check passed" before it loads P's agent metadata, so a later failure of the same
handshake must not count as a pass."""

from __future__ import annotations

from tests.live import live

PASSED = f"INFO [base_worker.py:1093] {live.HANDSHAKE_PASSED} (hash: ab)"
FAILED = f"ERROR [base_worker.py:1318] {live.HANDSHAKE_FAILED} | remote_engine_id=x"
TIMED_OUT = "  File \"zmq/backend/cython/_zmq.py\", line 186\nzmq.error.Again: Resource " \
            "temporarily unavailable"


def _log(*records: str) -> str:
    return "\n".join(records) + "\n"


def test_a_timeout_then_a_pass():
    assert live.handshake_outcomes(_log(FAILED, TIMED_OUT, PASSED)) == ["timeout", "passed"]


def test_a_pass_that_fails_afterwards_is_a_failure():
    log = _log(PASSED, FAILED, "RuntimeError: loadRemoteMD failed", PASSED)
    assert live.handshake_outcomes(log) == ["failed", "passed"]


def test_a_mismatch_and_an_unfinished_traceback():
    mismatch = "RuntimeError: NIXL compatibility hash mismatch. Local: a, Remote: b"
    assert live.handshake_outcomes(_log(FAILED, mismatch)) == ["mismatch"]
    assert live.handshake_outcomes(_log(FAILED, "Traceback (most recent call last):")) == \
        ["pending"]
