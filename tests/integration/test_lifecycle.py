"""`pdctl dev cluster up|status|down` on a second, throw-away cluster: a component that dies is
reported by `status`, `up` restores it (and only it), and `down` leaves nothing running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from pd_dev.devcluster import build, cluster, processes
from tests.helpers import pdctl, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def dev_cluster_cmd(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([pdctl(), "dev", "cluster", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def _status(d: Path) -> tuple[int, dict]:
    out = dev_cluster_cmd("status", "--dir", str(d), "-o", "json")
    return out.returncode, json.loads(out.stdout)


def _by_name(st: dict) -> dict[str, dict]:
    return {c["name"]: c for c in st["components"]}


def _kubectl(d: Path, *args: str, input: str | None = None, check: bool = True):
    out = subprocess.run([str(build.binary_path("kubectl")), f"--kubeconfig={d / 'kubeconfig'}",
                          *args], input=input, capture_output=True, text=True, timeout=60,
                         check=False)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def _wait_dead(d: Path, name: str) -> dict:
    def dead() -> dict | None:
        rc, st = _status(d)
        return None if _by_name(st)[name]["running"] else st | {"rc": rc}

    return wait_for(f"status to show {name} not running", dead, timeout=20, every=0.2)


def test_status_reports_dead_component_and_up_restores(dev_cluster, tmp_path):
    d = tmp_path / "second-cluster"
    up = dev_cluster_cmd("up", "--dir", str(d), "--nodes", "1", "--no-build", "--no-real-node")
    assert up.returncode == 0, up.stderr
    pids: dict[str, int] = {}
    recorded: dict[str, dict] = {}
    ports: list[int] = []
    try:
        rc, st = _status(d)
        assert rc == 0 and st["ok"], st
        assert st["nodes_ready"] == 1
        pids = {n: c["pid"] for n, c in _by_name(st).items()}
        ports = list(json.loads((d / "state.json").read_text())["ports"].values())
        assert set(pids) == {"etcd", "kube-apiserver", "kube-controller-manager",
                             "kube-scheduler", "kwok"}

        # 1. the scheduler dies
        os.kill(pids["kube-scheduler"], signal.SIGKILL)
        st = _wait_dead(d, "kube-scheduler")
        assert st["rc"] == 1 and not st["ok"]
        comps = _by_name(st)
        assert all(comps[n]["running"] for n in pids if n != "kube-scheduler")
        table = dev_cluster_cmd("status", "--dir", str(d))
        assert table.returncode == 1
        row = next(line for line in table.stdout.splitlines() if line.startswith("kube-scheduler"))
        assert " NO " in row and "DEGRADED" in table.stdout

        # a pod stays unscheduled while it is gone
        pod = yaml.safe_dump({"apiVersion": "v1", "kind": "Pod",
                              "metadata": {"name": "gpu-pod", "namespace": "default"},
                              "spec": {"containers": [{"name": "c", "image": "none",
                                       "resources": {"limits": {"nvidia.com/gpu": "2"}}}]}})
        _kubectl(d, "apply", "-f", "-", input=pod)
        time.sleep(2)
        node = _kubectl(d, "get", "pod", "gpu-pod", "-o", "jsonpath={.spec.nodeName}").stdout
        assert node == ""

        # 2. `up` again restores exactly the dead one
        up2 = dev_cluster_cmd("up", "--dir", str(d), "--nodes", "1", "--no-build", "--no-real-node")
        assert up2.returncode == 0, up2.stderr
        assert "kube-scheduler: started" in up2.stderr
        rc, st = _status(d)
        assert rc == 0 and st["ok"]
        new = {n: c["pid"] for n, c in _by_name(st).items()}
        assert new["kube-scheduler"] != pids["kube-scheduler"]
        assert all(new[n] == pids[n] for n in pids if n != "kube-scheduler")
        pids = new
        _kubectl(d, "wait", "--for=condition=Ready", "pod/gpu-pod", "--timeout=60s")
        node = _kubectl(d, "get", "pod", "gpu-pod", "-o", "jsonpath={.spec.nodeName}").stdout
        assert node == "gpu-node-0"

        # 3. etcd dies: the apiserver turns unready; `up` restarts etcd, the data survives
        os.kill(pids["etcd"], signal.SIGKILL)
        st = _wait_dead(d, "etcd")
        assert st["rc"] == 1
        up3 = dev_cluster_cmd("up", "--dir", str(d), "--nodes", "1", "--no-build", "--no-real-node")
        assert up3.returncode == 0, up3.stderr
        rc, st = _status(d)
        assert rc == 0 and st["ok"]
        pids = {n: c["pid"] for n, c in _by_name(st).items()}
        recorded = json.loads((d / "state.json").read_text())["procs"]
        assert {n: p["pid"] for n, p in recorded.items()} == pids
        phase = _kubectl(d, "get", "pod", "gpu-pod", "-o", "jsonpath={.status.phase}").stdout
        assert phase == "Running"
    finally:
        down = dev_cluster_cmd("down", "--dir", str(d))
    assert down.returncode == 0, down.stderr
    # nothing left running: every PID it ever started is gone, every port is free again
    assert recorded, "the test never got as far as recording the PIDs"
    for name, p in recorded.items():
        assert not processes.alive(processes.Proc(p["pid"], p["start_time"])), name
    for port in ports:
        assert processes.port_free(port), port
    rc, st = _status(d)
    assert rc == 1 and not any(c["running"] for c in st["components"])
    assert not cluster.layout_for(d).etcd_data.exists()
