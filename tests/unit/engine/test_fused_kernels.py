"""kernels.fused on the CPU: Triton's interpreter (TRITON_INTERPRET=1, in a child process: the
variable must be set before the kernels are defined) runs the fused RMSNorm, rope, K/V write and
SwiGLU kernels against the torch ops they replace, and whole tiny models fused against unfused
(float32 greedy tokens equal, bfloat16 logits within rounding). The switch PD_RUNTIME_FUSED and
the CPU's default (the torch ops, unchanged) are checked in this process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pd_runtime.engine.model import fused_for

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[3]


def _interpreted(*args: str) -> str:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    r = subprocess.run([sys.executable, "-m", "tests.fused_checks", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_kernels_equal_torch_ops_interpreted() -> None:
    assert _interpreted("kernels").strip().endswith("ok")


@pytest.mark.slow
def test_models_fused_equal_unfused_interpreted(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    out = _interpreted("model", str(tmp_path), "dense", "dense-qk-norm", "sliding", "mla")
    assert out.count("fused == unfused") == 4


def test_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PD_RUNTIME_FUSED", raising=False)
    assert fused_for("cpu") is False  # the CPU is the reference: always the torch ops
    monkeypatch.setenv("PD_RUNTIME_FUSED", "0")
    assert fused_for("cuda") is False
    monkeypatch.setenv("PD_RUNTIME_FUSED", "yes")
    with pytest.raises(ValueError, match="PD_RUNTIME_FUSED"):
        fused_for("cuda")
    monkeypatch.setenv("PD_RUNTIME_FUSED", "1")
    from pd_runtime.kernels.segcopy import triton_available

    assert fused_for("cuda") is triton_available("cuda")
    assert torch.device("cpu").type == "cpu"
