"""`pdctl run` planning (pure: what the operator renders, with the local profile) and its
process handling (process groups started, health-waited, stopped with nothing left behind)."""

from __future__ import annotations

import copy
import itertools
import json
import os
import sys
import time
from pathlib import Path

import pytest
import yaml

from pd_operator import localrun
from pd_operator.render import Owner, render
from pd_operator.validate import parse_object, validate_spec
from tests.helpers import group_members

ROOT = Path(__file__).resolve().parents[3]
TINY = yaml.safe_load((ROOT / "tests/e2e/deployments/tiny-dense.yaml").read_text())
pytestmark = pytest.mark.timeout(60)


def counter(start: int = 30000):
    it = itertools.count(start, 100)
    return lambda n: next(it)


def plan(doc: dict, tmp_path: Path, **kw):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir(exist_ok=True)
    return localrun.plan_run(doc, model_dirs=kw.pop("model_dirs", {"pd-test/tiny-llama":
                                                                  str(ckpt)}),
                             router_port=8123, workdir=tmp_path / "run", ports=counter(), **kw)


def rendered(doc: dict) -> dict:
    out = render(Owner("tiny-dense", "default", "local"), validate_spec(parse_object(doc).spec))
    return {(c["kind"], c["metadata"]["name"]): c for c in out.children}


def test_engine_commands_are_the_rendered_ones_with_ports_mapped(tmp_path):
    doc = copy.deepcopy(TINY)
    doc["spec"]["decode"]["replicas"] = 2
    p = plan(doc, tmp_path)
    children = rendered(doc)
    assert [e.name for e in p.engines] == ["prefill-0", "decode-0", "decode-1"]
    for e in p.engines:
        sts = children["StatefulSet", f"tiny-dense-{e.role}"]["spec"]["template"]["spec"]
        cmd = sts["containers"][0]["command"]
        assert e.argv[:3] == [sys.executable, "-m", "pd_runtime.cli"]
        local, appended = e.argv[3:3 + len(cmd) - 1], e.argv[3 + len(cmd) - 1:]
        diff = [(a, b) for a, b in zip(cmd[1:], local, strict=True) if a != b]
        assert diff == [("8000", str(e.port)), ("5600", str(e.side_channel_port))]
        assert appended == ["--host", "127.0.0.1", "--device", "cpu", "--model-dir",
                            str((tmp_path / "ckpt").resolve())]
        assert e.env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "127.0.0.1"
        assert e.env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == str(e.side_channel_port)
        cm = children["ConfigMap", "tiny-dense-config"]["data"]
        assert e.files[f"etc/pd-operator/{e.role}.json"] == cm[f"{e.role}.json"]
    tokens = {e.files["var/run/secrets/pd-runtime/token"] for e in p.engines}
    assert len(tokens) == 1 and len(tokens.pop()) >= 32  # one shared token per run
    assert len({e.port for e in p.engines} | {e.side_channel_port for e in p.engines}) == 6


def test_router_is_rendered_with_static_urls(tmp_path):
    p = plan(TINY, tmp_path)
    argv = p.router.argv
    assert Path(argv[0]).name == "vllm-router"
    for flag in localrun.DISCOVERY_FLAGS:
        assert flag not in argv
    assert "--vllm-pd-disaggregation" in argv
    assert argv[argv.index("--policy") + 1] == "round_robin"
    assert argv[argv.index("--port") + 1] == "8123"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--prefill") + 1] == p.engines[0].url
    assert argv[argv.index("--decode") + 1] == p.engines[1].url
    assert p.url == "http://127.0.0.1:8123"


def test_refusals_name_the_field(tmp_path):
    with pytest.raises(localrun.RunError, match="spec.model.name is 'pd-test/tiny-llama'"):
        plan(TINY, tmp_path, model_dirs={})
    with pytest.raises(localrun.RunError, match="no such file"):
        plan(TINY, tmp_path, model_dirs={"*": str(tmp_path / "nope")})
    bad = copy.deepcopy(TINY)
    bad["spec"]["decode"]["tensorParallelSize"] = 3
    with pytest.raises(localrun.RunError, match="reject"):
        plan(bad, tmp_path)


HEALTH_SERVER = r"""
import http.server, os, subprocess, sys
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])  # a TP-worker stand-in
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers()
    def log_message(self, *a): pass
print("serving", flush=True)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def _alive(pid: int) -> bool:
    return pid in group_members(pid)


def test_free_ports_stay_out_of_the_ephemeral_range():
    # a port handed out now is bound a minute later (the router's after the engines): one in the
    # kernel's ephemeral range may by then be the local end of some outgoing connection
    lo, hi = localrun.ephemeral_ports()
    assert 1024 <= lo < hi <= 65535
    for count in (1, 1, 1, 4, 8) * 10:
        base = localrun.free_ports(count)
        assert base + count <= lo or base > hi, (base, count, lo, hi)
        assert 20000 <= base and base + count <= 60000


def test_local_run_starts_waits_and_stops_process_groups(tmp_path):
    ports = [localrun.free_ports(1) for _ in range(3)]

    def proc(name: str, port: int) -> localrun.Proc:
        return localrun.Proc(name=name, role=name.split("-")[0],
                             argv=[sys.executable, "-c", HEALTH_SERVER, str(port)], env={},
                             files={"etc/x.json": "{}"}, port=port)

    p = localrun.Plan(name="t", engines=[proc("prefill-0", ports[0]), proc("decode-0", ports[1])],
                      router=proc("router", ports[2]), router_metrics_port=0,
                      workdir=tmp_path / "run")
    lines: list[str] = []
    run = localrun.LocalRun(p, lines.append)
    with run:
        run.start(timeout_s=30)
        state = json.loads((tmp_path / "run/run.json").read_text())
        assert state["url"] == p.url and len(state["replicas"]) == 2
        assert (tmp_path / "run/mounts/prefill-0/etc/x.json").exists()
        pids = [r["pid"] for r in state["replicas"]] + [state["router"]["pid"]]
        assert all(_alive(pid) for pid in pids)
        assert any("prefill-0: ready" in line for line in lines)
        os.killpg(state["replicas"][0]["pid"], 9)
        time.sleep(0.3)
        assert run.check_exits() == ["prefill-0 exited with code -9"]
        assert run.check_exits() == []
        groups = pids
    t0 = time.monotonic()
    for _ in range(50):
        if not any(_alive(pid) for pid in groups):
            break
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in groups)
    # the grandchildren (same process groups) are gone too
    assert not any(group_members(pgid) for pgid in groups)
    assert time.monotonic() - t0 < 10


def test_a_replica_that_dies_while_starting_is_reported(tmp_path):
    bad = localrun.Proc(name="prefill-0", role="prefill",
                        argv=[sys.executable, "-c", "print('preflight failed: x'); exit(2)"],
                        env={}, port=localrun.free_ports(1))
    p = localrun.Plan(name="t", engines=[bad], router=bad, router_metrics_port=0,
                      workdir=tmp_path)
    with localrun.LocalRun(p, lambda s: None) as run:
        with pytest.raises(localrun.RunError, match="exited with code 2(.|\n)*preflight failed"):
            run.start(timeout_s=20)


def test_pdctl_run_cli_refuses_before_starting_anything(tmp_path, capsys):
    from pd_operator.cli import run_cmds
    from pd_operator.cli.main import main

    assert run_cmds._model_dirs(["org/m=/a", "/b", "x=y=/c"]) == {"org/m": "/a", "*": "/b",
                                                                   "x=y": "/c"}
    f = tmp_path / "d.yaml"
    f.write_text(yaml.safe_dump(TINY))
    assert main(["run", str(f), "--workdir", str(tmp_path / "w")]) == 2
    assert "--model-dir pd-test/tiny-llama=PATH" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()  # nothing started
    bad = copy.deepcopy(TINY)
    bad["spec"]["prefill"]["blockSize"] = "big"
    f.write_text(yaml.safe_dump(bad))
    assert main(["run", str(f), "--model-dir", str(tmp_path)]) == 2
    assert "spec.prefill.blockSize" in capsys.readouterr().err


def test_a_bundled_model_needs_no_model_dir(tmp_path):
    doc = yaml.safe_load((ROOT / "deploy/examples/local/smollm2-realnode-p1-d3.yaml").read_text())
    p = plan(doc, tmp_path, model_dirs={})
    assert all("--model-dir" not in e.argv for e in p.engines)
    mapped = plan(doc, tmp_path, model_dirs={"*": str(tmp_path)})
    assert all("--model-dir" in e.argv for e in mapped.engines)
