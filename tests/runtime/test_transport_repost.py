"""A finished READ's NIXL handle is posted again for a READ of the same ranges (transport.py):
the bytes are the source's at the time of each READ, each post carries its own notification,
and a handle whose READ failed, whose peer went or that the bound pushes out is released, never
reused. Two transports in one process, over UCX host memory and, where CUDA is, on the GPU."""

from __future__ import annotations

import time

import pytest

from tests.helpers import eventually, nixl_import_error

NIXL_ERR = nixl_import_error()

pytestmark = [
    pytest.mark.nixl,
    pytest.mark.skipif(NIXL_ERR is not None, reason=f"nixl cannot be imported here: {NIXL_ERR}"),
]

SIZE = 1 << 16


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def link(request):
    import torch

    from pd_runtime.transport import Transport

    device = request.param
    if device == "cuda" and not _cuda():
        pytest.skip("no CUDA device here")
    src = Transport(f"repost-src-{device}", device)
    dst = Transport(f"repost-dst-{device}", device, repost=True)
    a = torch.zeros(SIZE, dtype=torch.uint8, device=device)
    b = torch.zeros(SIZE, dtype=torch.uint8, device=device)
    src.register(a)
    dst.register(b)
    peer = dst.add_peer(src.metadata())
    yield src, dst, peer, a, b
    dst.close()
    src.close()


def _read(dst, peer, b, a, off: int, n: int, notif: str):
    if a.is_cuda:  # the source's fill is queued on torch's stream; NIXL copies on its own
        import torch

        torch.cuda.synchronize()
    r = dst.read(peer, (b.data_ptr() + off, n, 0), (a.data_ptr() + off, n, 0), notif)
    dst.wait([r], 10.0)
    return r


def _notifs_until(src, want: set[str]) -> set[str]:
    got: set[str] = set()

    def arrived():
        got.update(m for _, m in src.notifs())
        return want <= got

    eventually(arrived, timeout=10.0)
    return got


def test_same_ranges_repost_the_handle_with_fresh_bytes_and_notification(link):
    src, dst, peer, a, b = link
    handles = []
    for i in range(4):
        a[:4096] = i + 1
        r = _read(dst, peer, b, a, 0, 4096, f"req-{i}")
        handles.append(r.handle)
        assert int(b[:4096].min()) == int(b[:4096].max()) == i + 1
    assert all(h is handles[0] for h in handles)  # one handle, posted four times
    assert {f"req-{i}" for i in range(4)} <= _notifs_until(src, {f"req-{i}" for i in range(4)})


def test_other_ranges_get_their_own_handle(link):
    src, dst, peer, a, b = link
    a[:] = 7
    first = _read(dst, peer, b, a, 0, 4096, "x0")
    other = _read(dst, peer, b, a, 8192, 4096, "x1")
    longer = _read(dst, peer, b, a, 0, 8192, "x2")
    assert other.handle is not first.handle and longer.handle is not first.handle
    assert int(b[:12288].min()) == 7
    assert _read(dst, peer, b, a, 0, 4096, "x3").handle is first.handle


def test_repost_off_builds_a_handle_per_read(link, monkeypatch):
    import torch

    from pd_runtime.transport import Transport

    src, _, _, a, _ = link
    monkeypatch.setenv("PD_RUNTIME_NIXL_REPOST", "off")
    dst = Transport("repost-off", str(a.device))
    try:
        assert dst.repost is False
        b = torch.zeros(SIZE, dtype=torch.uint8, device=a.device)
        dst.register(b)
        peer = dst.add_peer(src.metadata())
        a[:4096] = 3
        r1 = _read(dst, peer, b, a, 0, 4096, "o0")
        r2 = _read(dst, peer, b, a, 0, 4096, "o1")
        assert r1.handle is not r2.handle and not dst._idle
        assert int(b[:4096].min()) == 3
    finally:
        dst.close()


def test_a_wrong_switch_value_is_refused_by_name(monkeypatch):
    from pd_runtime.transport import Transport

    monkeypatch.setenv("PD_RUNTIME_NIXL_REPOST", "yes")
    with pytest.raises(ValueError, match="PD_RUNTIME_NIXL_REPOST='yes'"):
        Transport("repost-bad")


def test_a_failed_read_is_released_not_kept(link):
    from pd_runtime.transport import TransferError

    src, dst, peer, a, b = link
    real = dst.agent

    class FailingChecks:  # the real agent, but every READ reports ERR when checked
        def __getattr__(self, name):
            return getattr(real, name)

        def check_xfer_state(self, h):
            while real.check_xfer_state(h) == "PROC":  # let the real READ end first
                time.sleep(0.001)
            return "ERR"

    dst.agent = FailingChecks()
    try:
        r = dst.read(peer, (b.data_ptr(), 4096, 0), (a.data_ptr(), 4096, 0), "f0")
        with pytest.raises(TransferError, match="transfer failed"):
            dst.wait([r], 10.0)
    finally:
        dst.agent = real
    assert not dst._idle
    assert _read(dst, peer, b, a, 0, 4096, "f1").handle is not r.handle


def test_a_removed_peer_takes_its_handles_and_the_bound_holds(link, monkeypatch):
    import pd_runtime.transport as transport

    src, dst, peer, a, b = link
    monkeypatch.setattr(transport, "IDLE_HANDLES", 3)
    for k in range(5):
        _read(dst, peer, b, a, k * 4096, 4096, f"b{k}")
    kept = [key[1][0] - b.data_ptr() for key in dst._idle]
    assert kept == [2 * 4096, 3 * 4096, 4 * 4096]  # the least recent went first
    dst.remove_peer(peer)
    assert not dst._idle
    peer = dst.add_peer(src.metadata())
    a[:4096] = 9
    _read(dst, peer, b, a, 0, 4096, "b5")
    assert int(b[:4096].min()) == 9
