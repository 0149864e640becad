"""What every test tier (and the operator benchmarks) share: a free port, a deadline poll, how to
start pdctl, and a small valid PDDeployment. Import as `from tests.helpers import ...`."""

from __future__ import annotations

import copy
import shutil
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "deploy" / "examples"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, fn: Callable[[], Any], timeout: float = 60, every: float = 0.5,
             diagnose: Callable[[], str] | None = None) -> Any:
    """Poll `fn` until it returns something truthy and return that; an exception counts as not
    yet. At the deadline fail naming `what`, the last value or error, and `diagnose()`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = fn()
        except Exception as exc:  # noqa: BLE001 - shown at the deadline
            last = exc
        if last and not isinstance(last, Exception):
            return last
        if time.monotonic() > deadline:
            extra = f" {diagnose()}" if diagnose is not None else ""
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; "
                                 f"last: {last!r}{extra}")
        time.sleep(every)


def eventually(pred: Callable[[], Any], timeout: float = 5.0, every: float = 0.02) -> bool:
    """Whether `pred` holds within `timeout` (checked once more at the end); for asserting that
    something does NOT happen within a while, too."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(every)
    return bool(pred())


def pdctl() -> str:
    """The pdctl executable: the console script beside this interpreter (the venv's), else the
    one on PATH."""
    script = Path(sys.executable).parent / "pdctl"
    if script.exists():
        return str(script)
    found = shutil.which("pdctl")
    if found is None:
        raise FileNotFoundError(f"no pdctl beside {sys.executable} or on PATH: install the "
                                "project (make venv)")
    return found


LLAMA_8B: dict[str, Any] = {
    "name": "meta-llama/Llama-3.1-8B-Instruct", "family": "dense", "numKVHeads": 8,
    "headSize": 128, "numHiddenLayers": 32,
}


def sample_pdd(version: str = "0.33.0", *, name: str = "t", namespace: str | None = None,
               model: dict[str, Any] | None = None, engine: dict[str, Any] | None = None,
               prefill: dict[str, Any] | None = None, decode: dict[str, Any] | None = None,
               **spec: Any) -> dict[str, Any]:
    """A small valid PDDeployment as read from YAML: Llama-3.1-8B on vLLM `version`, both pools
    FLASH_ATTN. `engine`, `prefill` and `decode` are merged into their defaults; other keyword
    arguments are further spec keys (router=..., kvTransfer=..., validation=...)."""
    metadata: dict[str, Any] = {"name": name}
    if namespace is not None:
        metadata["namespace"] = namespace
    return {
        "apiVersion": "serving.pd-operator.dev/v1alpha1", "kind": "PDDeployment",
        "metadata": metadata,
        "spec": {
            "model": copy.deepcopy(model or LLAMA_8B),
            "engine": {"image": f"vllm/vllm-openai:v{version}", **(engine or {})},
            "prefill": {"attentionBackend": "FLASH_ATTN", **copy.deepcopy(prefill or {})},
            "decode": {"attentionBackend": "FLASH_ATTN", **copy.deepcopy(decode or {})},
            **copy.deepcopy(spec),
        },
    }
