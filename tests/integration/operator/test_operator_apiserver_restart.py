"""The API server restarts under a running operator (on a second, throw-away control plane, so
the shared one is never disturbed): the operator survives, keeps its lease, and reconciles
changes made after the restart.

Two clocks, because two parties are involved:

- The operator's part (it sees the change and applies it, it writes the status) must happen within
  OPERATOR_DEADLINE of the API server being back. kopf re-lists after the restart (410 Gone) and
  never gives up retrying a watch (handlers.RetryForever), so this takes seconds; there is no
  periodic resync that could hide a lost watch (its period would be longer than this deadline).
- Pods becoming Ready is the control plane's part: kube-controller-manager's StatefulSet
  controller, the scheduler and kwok only act once their own client-go informers have re-listed,
  and after an API server restart each reflector backs off first (measured here: 34-50 s after
  its 410, up to 30 s x 2 jitter, and once more when the re-list meets 429 "storage is
  (re)initializing"). CONTROL_PLANE_DEADLINE covers that; the old single 120 s deadline did not,
  which is why this test failed intermittently although the operator had done its part.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest

from pd_dev.devcluster import build

from op_cluster import CRD, Operator, load_example, pdctl, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

OPERATOR_DEADLINE = 45.0
CONTROL_PLANE_DEADLINE = 240.0


def _small(name: str) -> dict[str, Any]:
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

    def get(*args: str) -> dict[str, Any] | None:
        out = kubectl("get", *args, "-o", "json", check=False)
        return json.loads(out.stdout) if out.returncode == 0 else None

    def pdd_observed(name: str, generation: int) -> Callable[[], bool]:
        """The operator reconciled `generation`: it wrote a status for it."""
        def check() -> bool:
            obj = get("pdd", name)
            return bool(obj and obj["metadata"]["generation"] >= generation and
                        (obj.get("status") or {}).get("observedGeneration") ==
                        obj["metadata"]["generation"])
        return check

    def ready(name: str, generation: int) -> Callable[[], bool]:
        def check() -> bool:
            obj = get("pdd", name)
            return bool(pdd_observed(name, generation)() and obj and
                        obj["status"].get("phase") == "Ready")
        return check

    def sts_replicas(name: str, replicas: int) -> Callable[[], bool]:
        def check() -> bool:
            obj = get("sts", name)
            return bool(obj and obj["spec"]["replicas"] == replicas)
        return check

    def apiserver_pid() -> int:
        st = json.loads(dev("status", "-o", "json").stdout)
        return next(c["pid"] for c in st["components"] if c["name"] == "kube-apiserver")

    up = dev("up", "--nodes", "1", "--no-build", "--no-real-node")
    assert up.returncode == 0, up.stderr
    op = None
    timings: dict[str, float] = {}
    try:
        kubectl("apply", "--server-side", "-f", str(CRD))
        kubectl("wait", "--for=condition=Established",
                "crd/pddeployments.serving.pd-operator.dev", "--timeout=60s")
        op = Operator(kc, "default", tmp_path, lease_duration=4.0).start()
        kubectl("apply", "-f", "-", input=json.dumps(_small("before")))
        wait_for("'before' Ready", ready("before", 1), timeout=120)

        pid = apiserver_pid()
        os.kill(pid, signal.SIGKILL)
        time.sleep(3)  # the operator sees connection errors meanwhile
        assert op.alive()
        up2 = dev("up", "--nodes", "1", "--no-build", "--no-real-node")
        assert up2.returncode == 0, up2.stderr
        back = time.monotonic()
        assert op.alive(), op.output()[-3000:]
        assert apiserver_pid() != pid

        # changes made after the restart are seen and applied by the same process ...
        kubectl("patch", "pdd", "before", "--type=merge", "-p",
                json.dumps({"spec": {"decode": {"replicas": 2}}}))
        wait_for("the operator to apply 'before' generation 2",
                 lambda: sts_replicas("before-decode", 2)() and pdd_observed("before", 2)(),
                 timeout=OPERATOR_DEADLINE)
        timings["patch applied"] = time.monotonic() - back
        kubectl("apply", "-f", "-", input=json.dumps(_small("after")))
        wait_for("the operator to apply 'after'",
                 lambda: sts_replicas("after-decode", 1)() and pdd_observed("after", 1)(),
                 timeout=OPERATOR_DEADLINE)
        timings["new object applied"] = time.monotonic() - back

        # ... and the status follows the pods once the control plane has caught up
        wait_for("'before' scaled and Ready", ready("before", 2),
                 timeout=CONTROL_PLANE_DEADLINE)
        timings["'before' Ready"] = time.monotonic() - back
        wait_for("'after' Ready", ready("after", 1), timeout=CONTROL_PLANE_DEADLINE)
        timings["'after' Ready"] = time.monotonic() - back
        assert op.alive() and op.starts == 1
        assert "has failed" not in op.output(), "a kopf task died:\n" + op.output()[-3000:]
    finally:
        print("seconds after the API server was back:",
              ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
        if op is not None:
            op.stop()
            print(op.output()[-4000:])
        dev("down")
