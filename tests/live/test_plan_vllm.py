"""`pdctl run`'s plan for engine.type vllm (no vLLM needed): the rendered arguments and
environment unchanged but for the local port and host, the CPU local profile added."""

from __future__ import annotations

from pathlib import Path

import pytest

from pd_operator import localrun_vllm
from pd_operator.localrun import RunError, plan_run
from pd_operator.render import Owner, render
from pd_operator.validate import parse_object, validate_spec
from tests.live import live

FAKE_PYTHON = "/live-env/bin/python"


def _ports() -> object:
    counter = iter(range(31000, 32000, 10))
    return lambda n: next(counter)


def _rendered_command(doc: dict, role: str) -> list[str]:
    rendered = render(Owner(name="live-tiny", namespace="default", uid="x"),
                      validate_spec(parse_object(doc).spec))
    (sts,) = [c for c in rendered.children
              if c["kind"] == "StatefulSet" and c["metadata"]["name"] == f"live-tiny-{role}"]
    return sts["spec"]["template"]["spec"]["containers"][0]["command"]


@pytest.fixture
def fake_live(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(localrun_vllm, "_live_python", lambda: FAKE_PYTHON)
    for name in localrun_vllm.CPU_PROFILE:
        monkeypatch.delenv(name, raising=False)


def test_cpu_plan_keeps_rendered_arguments_and_env(fake_live: None, tmp_path: Path) -> None:
    doc = live.spec_doc(str(tmp_path))
    plan = plan_run(doc, model_dirs={}, router_port=8123, workdir=tmp_path, ports=_ports())
    assert [p.name for p in plan.engines] == ["prefill-0", "decode-0"]
    for proc in plan.engines:
        rendered = _rendered_command(doc, proc.role)
        assert proc.argv[:3] == [FAKE_PYTHON, "-m", localrun_vllm.API_SERVER_MODULE]
        args = proc.argv[3:]
        assert args[-2:] == ["--host", "127.0.0.1"]
        i = rendered.index("--port")
        assert args[:-2] == [*rendered[2:i + 1], str(proc.port), *rendered[i + 2:]]
        assert proc.env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "127.0.0.1"
        assert proc.env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == str(proc.side_channel_port)
        assert proc.env["VLLM_KV_CACHE_LAYOUT"] == "HND"  # rendered, kept
        assert {k: proc.env[k] for k in localrun_vllm.CPU_PROFILE} == localrun_vllm.CPU_PROFILE
    assert len({p.port for p in plan.engines} | {p.side_channel_port for p in plan.engines}) == 4
    assert "--prefill" in plan.router.argv and "--service-discovery" not in plan.router.argv


def test_cpu_profile_yields_to_the_callers_environment(fake_live: None, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")
    plan = plan_run(live.spec_doc(str(tmp_path)), model_dirs={}, router_port=8123,
                    workdir=tmp_path, ports=_ports())
    assert {p.env["VLLM_CPU_KVCACHE_SPACE"] for p in plan.engines} == {"4"}


def test_model_string_is_not_remapped(fake_live: None, tmp_path: Path) -> None:
    with pytest.raises(RunError, match="hash factor"):
        plan_run(live.spec_doc(str(tmp_path)), model_dirs={str(tmp_path): "/elsewhere"},
                 router_port=8123, workdir=tmp_path, ports=_ports())
    with pytest.raises(RunError, match="not a local path"):
        plan_run(live.spec_doc("org/not-here"), model_dirs={}, router_port=8123,
                 workdir=tmp_path, ports=_ports())


def test_cuda_plan_runs_vllm_serve_from_path(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pd_operator.localrun.shutil.which",
                        lambda name: f"/usr/local/bin/{name}")
    monkeypatch.setattr(localrun_vllm, "_live_python", lambda: pytest.fail("CPU env used"))
    plan = plan_run(live.spec_doc(str(tmp_path)), model_dirs={}, router_port=8123,
                    workdir=tmp_path, device="cuda", ports=_ports())
    proc = plan.engines[0]
    assert proc.argv[:2] == ["/usr/local/bin/vllm", "serve"]
    assert not set(localrun_vllm.CPU_PROFILE) & set(proc.env)
