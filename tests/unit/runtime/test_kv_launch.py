"""How the template kernels are launched (kernels/kvcopy.py): PD_RUNTIME_KV_LAUNCH picks the
direct launch of the compiled kernel (the default) or Triton's JIT on every call, a wrong value
is refused by name, and the direct launcher finds how the compiled kernel's launcher takes its
arguments or leaves the launch to the JIT. The launches themselves are checked on the GPU
(tests/gpu/test_runtime_transfer_gpu.py::test_direct_launches_give_the_jits_bytes)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from pd_runtime.kernels.kvcopy import KVProgram, _Direct  # noqa: E402
from pd_runtime.kvcache import ModelSpec, RankSpec, arena_layout  # noqa: E402
from pd_runtime.planner import Request  # noqa: E402
from pd_runtime.template import PairTemplate  # noqa: E402


def _template() -> tuple[PairTemplate, Request]:
    m = ModelSpec(num_layers=2, num_kv_heads=2, head_size=8)
    p = RankSpec(m, 1, 0, 16, "HND", 8)
    return PairTemplate(p, p), Request(40, {0: [5, 2, 7]})


@pytest.mark.parametrize("value,direct", [(None, True), ("direct", True), ("jit", False)])
def test_the_switch_picks_the_launch(monkeypatch, value, direct):
    if value is None:
        monkeypatch.delenv("PD_RUNTIME_KV_LAUNCH", raising=False)
    else:
        monkeypatch.setenv("PD_RUNTIME_KV_LAUNCH", value)
    tm, req = _template()
    prog = KVProgram(tm.gather, "cpu", True)
    assert prog.direct is direct
    src = (torch.arange(arena_layout(tm.p).nbytes) % 251 + 1).to(torch.uint8)
    dst = torch.zeros(tm.nbytes(40) + 256, dtype=torch.uint8)
    prog.run(src, dst, tm.dyn("prefill", req, 40), 256)  # on the CPU: torch ops, either way
    assert dst[256:].any()


def test_a_wrong_value_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("PD_RUNTIME_KV_LAUNCH", "fast")
    tm, _ = _template()
    with pytest.raises(ValueError, match="PD_RUNTIME_KV_LAUNCH='fast'.*direct, jit"):
        KVProgram(tm.gather, "cpu", True)


class _Kernel:
    """A compiled kernel's stand-in: its launcher takes `takes` arguments, like Triton's, which
    checks the count before anything runs."""

    def __init__(self, takes: int | None):
        self.takes, self.launched = takes, []

    def __getitem__(self, grid):
        def runner(*args):
            if len(args) != self.takes:
                raise TypeError(f"takes exactly {self.takes} arguments ({len(args)} given)")
            self.launched.append((grid, args))
        return runner


@pytest.mark.parametrize("takes,form", [(5, "all"), (2, "plain"), (None, "none")])
def test_the_direct_launcher_finds_the_argument_form(takes, form):
    k = _Kernel(takes)
    d = _Direct(k)
    ptrs, consts = ("src", "dst"), (1, 2, 3)
    for _ in range(3):
        assert d.launch((4, 1, 1), ptrs, consts) is (form != "none")
    assert d.form == form
    want = {"all": ptrs + consts, "plain": ptrs}.get(form)
    assert k.launched == ([] if want is None else [((4, 1, 1), want)] * 3)
