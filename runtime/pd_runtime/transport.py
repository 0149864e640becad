"""NIXL (UCX) transport: one registered arena per side, one READ descriptor per (request, peer).

A finished READ's handle is kept, under its (peer, local range, remote range), and posted again
with the next request's notification when a READ of the same ranges comes (the same receive
buffer and the same staging slot, as with requests of one size in turn): that skips building
two descriptor lists and a handle, and releasing it, on the decode side's critical path.
`PD_RUNTIME_NIXL_REPOST=off` builds and releases a handle per READ (the previous path).

On one GPU host set UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y and keep tcp in UCX_TLS (NIXL needs an
active-message transport): see ../shared/reference/transfer-performance.md §0a. `default_env()`
sets both unless the user already did.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from typing import Any

import torch

from .switches import env_choice


SPIN_POLLS = int(os.environ.get("PD_RUNTIME_SPIN_POLLS", "20000"))  # busy polls before sleeping
REPOSTS = ("on", "off")
IDLE_HANDLES = 32  # finished READ handles kept for reposting, per transport (least recent out)

Range = tuple[int, int, int]  # (address, bytes, device id)


class TransferError(RuntimeError):
    pass


def is_cuda(device: str) -> bool:
    """"cuda" and "cuda:N" alike (TP ranks name their device with its index)."""
    return torch.device(device).type == "cuda"


def default_env(device: str) -> None:
    if is_cuda(device):
        os.environ.setdefault("UCX_CUDA_IPC_ENABLE_GET_ZCOPY", "y")
        os.environ.setdefault("UCX_TLS", "cuda_ipc,cuda_copy,tcp")


def import_nixl():
    """(nixl_agent, nixl_agent_config). Raises ImportError with the reason."""
    errors = []
    for mod in ("nixl._api", "nixl_cu13._api", "nixl_cu12._api"):
        try:
            m = __import__(mod, fromlist=["nixl_agent", "nixl_agent_config"])
            return m.nixl_agent, m.nixl_agent_config
        except Exception as e:  # noqa: BLE001 - report every failure
            errors.append(f"{mod}: {e}")
    raise ImportError("nixl cannot be imported: " + "; ".join(errors))


class PostedRead:
    """A posted READ: NIXL's handle, and the key it is kept under once it has finished."""

    __slots__ = ("handle", "key")

    def __init__(self, handle: Any, key: tuple[str, Range, Range]):
        self.handle, self.key = handle, key


class Transport:
    def __init__(self, name: str, device: str = "cpu", num_threads: int = 0,
                 repost: bool | None = None):
        """`repost`: keep finished READ handles and post them again (module docstring); None
        reads PD_RUNTIME_NIXL_REPOST."""
        default_env(device)
        self.repost = (env_choice("PD_RUNTIME_NIXL_REPOST", REPOSTS, "on") == "on"
                       if repost is None else repost)
        agent_cls, cfg_cls = import_nixl()
        self.name = name
        self.device = device
        # "cuda:N" is VRAM too: registered as DRAM, no NIXL backend would move it to a peer's VRAM
        self.mem_type = "VRAM" if is_cuda(device) else "DRAM"
        self.agent = agent_cls(name, cfg_cls(enable_prog_thread=True, backends=["UCX"], num_threads=num_threads))
        self.regs: list[Any] = []
        self.peers: set[str] = set()
        self._meta_names: dict[bytes, str] = {}
        self._idle: OrderedDict[tuple[str, Range, Range], Any] = OrderedDict()
        self._idle_lock = threading.Lock()  # pulls of several requests run on several threads
        self.reposts = 0  # READs posted on a kept handle (for benches and stats)

    @staticmethod
    def dev_id(t: torch.Tensor) -> int:
        return t.device.index or 0 if t.is_cuda else 0

    def register(self, t: torch.Tensor) -> None:
        reg = self.agent.register_memory([(t.data_ptr(), t.numel() * t.element_size(), self.dev_id(t), "")], self.mem_type)
        self.regs.append(reg)

    def metadata(self) -> bytes:
        return self.agent.get_agent_metadata()

    def add_peer(self, meta: bytes) -> str:
        """Load a peer's agent metadata; the same metadata again (a reconnect) is a no-op."""
        known = self._meta_names.get(meta)
        if known is not None and known in self.peers:
            return known
        try:
            name = self.agent.add_remote_agent(meta)
        except Exception as e:  # noqa: BLE001 - nixl raises untyped errors
            raise TransferError(f"NIXL refused the peer's agent metadata: {e}") from e
        name = name.decode() if isinstance(name, bytes) else name
        self._drop_idle(name)  # new metadata under a known name: its old handles are stale
        self.peers.add(name)
        self._meta_names[meta] = name
        return name

    def remove_peer(self, name: str) -> None:
        if name in self.peers:
            self.peers.discard(name)
            self._meta_names = {m: n for m, n in self._meta_names.items() if n != name}
            self._drop_idle(name)
            try:
                self.agent.remove_remote_agent(name)
            except Exception:  # noqa: BLE001 - best effort on teardown
                pass

    def read(self, peer: str, local: Range, remote: Range, notif: str) -> PostedRead:
        """Post one READ of `local[1]` bytes: local (addr, len, dev) <- remote (addr, len, dev)."""
        key = (peer, local, remote)
        with self._idle_lock:
            h = self._idle.pop(key, None)
        try:
            if h is None:
                ld = self.agent.get_xfer_descs([local], self.mem_type)
                rd = self.agent.get_xfer_descs([remote], self.mem_type)
                h = self.agent.initialize_xfer("READ", ld, rd, peer, notif.encode())
                st = self.agent.transfer(h)
            else:  # the notification is bound per post
                st = self.agent.transfer(h, notif.encode())
                self.reposts += 1
        except Exception as e:  # noqa: BLE001 - nixl raises typed pybind errors
            if h is not None:
                self._release(h)
            raise TransferError(f"READ from {peer} could not be posted: {e}") from e
        if st == "ERR":
            self._release(h)
            raise TransferError(f"READ from {peer} failed at post")
        return PostedRead(h, key)

    def wait(self, reads: list[PostedRead], timeout: float) -> None:
        """Poll until every READ is DONE; on error or timeout release them all and raise. A
        finished READ's handle is kept for reposting (or released, with repost off)."""
        deadline = time.monotonic() + timeout
        pending = [r.handle for r in reads]
        err = None
        spins = 0
        try:
            while pending:
                still = []
                for h in pending:
                    try:
                        st = self.agent.check_xfer_state(h)
                    except Exception as e:  # noqa: BLE001
                        err = f"transfer failed: {e}"
                        break
                    if st == "ERR":
                        err = "transfer failed (peer error or dead peer)"
                        break
                    if st != "DONE":
                        still.append(h)
                if err:
                    break
                pending = still
                if pending and time.monotonic() > deadline:
                    err = f"transfer timed out after {timeout:.1f}s"
                    break
                if pending:
                    # spin first (a GPU READ finishes in well under a millisecond; a 0.2 ms sleep
                    # was a large part of the measured READ time), then back off
                    spins += 1
                    if spins > SPIN_POLLS:
                        time.sleep(0.00005 if spins < SPIN_POLLS + 2000 else 0.001)
        except BaseException:
            err = err or "interrupted"
            raise
        finally:
            for r in reads:
                if err or not self.repost or not self._keep(r):
                    self._release(r.handle)
        if err:
            raise TransferError(err)

    def _keep(self, r: PostedRead) -> bool:
        """Keep `r`'s finished handle for its ranges; False when one is kept already (a READ
        of the same ranges ran beside it) or its peer has gone since."""
        evicted = []
        with self._idle_lock:
            if r.key in self._idle or r.key[0] not in self.peers:
                return False
            self._idle[r.key] = r.handle
            while len(self._idle) > IDLE_HANDLES:
                evicted.append(self._idle.popitem(last=False)[1])
        for h in evicted:
            self._release(h)
        return True

    def _drop_idle(self, peer: str | None = None) -> None:
        """Release the kept handles of `peer` (every peer's when None)."""
        with self._idle_lock:
            gone = [k for k in self._idle if peer is None or k[0] == peer]
            handles = [self._idle.pop(k) for k in gone]
        for h in handles:
            self._release(h)

    def _release(self, h: Any) -> None:
        try:
            self.agent.release_xfer_handle(h)
        except Exception:  # noqa: BLE001 - a failed handle may refuse release
            pass

    def notifs(self) -> list[tuple[str, str]]:
        out = []
        for agent, msgs in self.agent.get_new_notifs().items():
            for m in msgs:
                out.append((agent, m.decode() if isinstance(m, bytes) else m))
        return out

    def send_notif(self, peer: str, msg: str) -> None:
        self.agent.send_notif(peer, msg.encode())

    def reset(self) -> None:
        """Forget peers and registrations but keep the agent (and its UCX workers) for reuse."""
        self.close()

    def close(self) -> None:
        self._drop_idle()
        for p in list(self.peers):
            self.remove_peer(p)
        for r in self.regs:
            try:
                self.agent.deregister_memory(r)
            except Exception:  # noqa: BLE001
                pass
        self.regs.clear()
