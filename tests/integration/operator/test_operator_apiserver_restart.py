"""The API server restarts under a running operator (on a second, throw-away control plane, so
the shared one is never disturbed): the operator survives, keeps its lease, and reconciles
changes made after the restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from pd_dev.devcluster import build

from op_cluster import CRD, Operator, load_example, pdctl, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def _small(name: str) -> dict:
    doc = load_example("accepted", "llama-3.1-8b-basic")
    doc["metadata"] = {"name": name, "namespace": "default"}
    for role in ("prefill", "decode"):
        doc["spec"][role]["replicas"] = 1
        doc["spec"][role]["template"].pop("nodeSelector", None)
    return doc


def test_operator_recovers_from_apiserver_restart(dev_cluster, tmp_path):  # noqa: ARG001
    d = tmp_path / "restart-cluster"
    kc = str(d / "kubeconfig")

    def dev(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([pdctl(), "dev", "cluster", *args, "--dir", str(d)],
                              capture_output=True, text=True, timeout=300)

    def kubectl(*args: str, input: str | None = None, check: bool = True):
        out = subprocess.run([str(build.binary_path("kubectl")), f"--kubeconfig={kc}", *args],
                             input=input, capture_output=True, text=True, timeout=60)
        if check:
            assert out.returncode == 0, out.stderr
        return out

    def ready(name: str, generation: int | None = None) -> bool:
        out = kubectl("get", "pdd", name, "-o", "json", check=False)
        if out.returncode != 0:
            return False
        obj = json.loads(out.stdout)
        st = obj.get("status") or {}
        return st.get("phase") == "Ready" and st.get("observedGeneration") == \
            obj["metadata"]["generation"] and (generation is None or
                                               obj["metadata"]["generation"] >= generation)

    up = dev("up", "--nodes", "1", "--no-build")
    assert up.returncode == 0, up.stderr
    op = None
    try:
        kubectl("apply", "--server-side", "-f", str(CRD))
        kubectl("wait", "--for=condition=Established",
                "crd/pddeployments.serving.pd-operator.dev", "--timeout=60s")
        op = Operator(kc, "default", tmp_path, lease_duration=4.0).start()
        kubectl("apply", "-f", "-", input=json.dumps(_small("before")))
        wait_for("'before' Ready", lambda: ready("before"), timeout=120)

        st = json.loads(dev("status", "-o", "json").stdout)
        pid = next(c["pid"] for c in st["components"] if c["name"] == "kube-apiserver")
        os.kill(pid, signal.SIGKILL)
        time.sleep(3)  # the operator sees connection errors meanwhile
        assert op.alive()
        up2 = dev("up", "--nodes", "1", "--no-build")
        assert up2.returncode == 0, up2.stderr
        assert op.alive(), op.output()[-3000:]
        st = json.loads(dev("status", "-o", "json").stdout)
        assert next(c["pid"] for c in st["components"] if c["name"] == "kube-apiserver") != pid

        # changes made after the restart are reconciled by the same process
        kubectl("patch", "pdd", "before", "--type=merge", "-p",
                json.dumps({"spec": {"decode": {"replicas": 2}}}))
        wait_for("'before' scaled and Ready", lambda: ready("before", 2), timeout=120)
        sts = json.loads(kubectl("get", "sts", "before-decode", "-o", "json").stdout)
        assert sts["spec"]["replicas"] == 2
        kubectl("apply", "-f", "-", input=json.dumps(_small("after")))
        wait_for("'after' Ready", lambda: ready("after"), timeout=120)
        assert op.alive() and op.starts == 1
    finally:
        if op is not None:
            op.stop()
            print(op.output()[-4000:])
        dev("down")
