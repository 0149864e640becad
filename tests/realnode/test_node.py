"""A pod really runs on the real node: `kubectl logs` and `kubectl exec` reach it, it resolves a
Service by name (CoreDNS) and reaches it and the API server through their ClusterIPs
(kube-proxy). That `down` leaves the host as it found it is checked by the session fixture
(tests/realnode/conftest.py) after the tier.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from pd_dev.devcluster import build, cluster
from pd_dev.devcluster import realnode as rn
from pd_dev.devcluster import realnode_host as rnh

pytestmark = [pytest.mark.realnode, pytest.mark.cluster, pytest.mark.slow]

IMAGE = "pd-operator.dev/busybox:realnode-test"
GREETING = "hello from the real node"


def _pod(name: str, command: str, labels: dict | None = None) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {
            "nodeSelector": {rn.REAL_NODE_LABEL: "true"},
            "tolerations": [{"key": rn.REAL_NODE_LABEL, "operator": "Exists",
                             "effect": "NoSchedule"}],
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "main",
                "image": IMAGE,
                "imagePullPolicy": "Never",
                "command": ["sh", "-c", command],
                # admitted only because the node's status carries fake GPUs
                "resources": {"limits": {"nvidia.com/gpu": "1", "memory": "32Mi",
                                         "cpu": "100m"}},
            }],
        },
    }


WEB = ("mkdir -p /tmp/www && echo served-by-web > /tmp/www/index.html && "
       "exec httpd -f -p 8080 -h /tmp/www")
SERVICE = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
           "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}}


def _http_get(ip: str, port: int) -> str:
    return f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {ip} {port}"


def _kubectl(kubeconfig: Path, *args: str) -> str:
    out = subprocess.run([str(build.binary_path("kubectl")), f"--kubeconfig={kubeconfig}",
                          *args], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, f"kubectl {' '.join(args)}: {out.stderr}{out.stdout}"
    return out.stdout


def _wait_running(core, name: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    pod = None
    while time.monotonic() < deadline:
        pod = core.read_namespaced_pod(name, "default")
        if pod.status.phase == "Running" and all(
                c.ready for c in pod.status.container_statuses or [False]):
            return pod
        time.sleep(0.3)
    raise AssertionError(f"pod {name} not running after {timeout:.0f}s: {pod and pod.status}")


def test_pod_runs_on_real_node(real_cluster):
    from kubernetes import client

    d = real_cluster.dir
    nl = rn.node_layout(d)
    rnh.import_image(nl, rnh.busybox_archive(IMAGE, print), IMAGE)
    layout = cluster.layout_for(d)
    with cluster.api_client(layout) as api:
        core = client.CoreV1Api(api)
        node = core.read_node(rn.NODE_NAME)
        assert node.status.allocatable["nvidia.com/gpu"] == "8"
        assert node.metadata.labels[rn.REAL_NODE_LABEL] == "true"
        core.create_namespaced_pod(
            "default", _pod("hello", f"echo {GREETING} $(hostname); exec sleep 3600"))
        core.create_namespaced_pod("default", _pod("web", WEB, {"app": "web"}))
        svc = core.create_namespaced_service("default", SERVICE)
        pod = _wait_running(core, "hello")
        _wait_running(core, "web")
        assert pod.spec.node_name == rn.NODE_NAME
        assert pod.status.pod_ip.startswith(rn.POD_SUBNET.rsplit(".", 1)[0] + ".")
        deadline = time.monotonic() + 20
        logs = ""
        while GREETING not in logs and time.monotonic() < deadline:
            logs = _kubectl(layout.kubeconfig, "logs", "hello")
            time.sleep(0.3)
        assert f"{GREETING} hello" in logs
        assert _kubectl(layout.kubeconfig, "exec", "hello", "--", "echo", "exec-ok").strip() \
            == "exec-ok"
        kc = layout.kubeconfig
        dns = _kubectl(kc, "exec", "hello", "--", "nslookup", "web.default.svc.cluster.local")
        assert svc.spec.cluster_ip in dns, dns
        assert "served-by-web" in _kubectl(kc, "exec", "hello", "--", "sh", "-c",
                                           _http_get(svc.spec.cluster_ip, 80))
        # the API server through the `kubernetes` Service (TLS port: a plain request is
        # answered with 400, which proves the path)
        assert "HTTP/1.0 400" in _kubectl(kc, "exec", "hello", "--", "sh", "-c",
                                          _http_get("10.96.0.1", 443))
        assert rnh.bridge_exists() and rnh.our_shims(nl)  # it really ran here
        for name in ("hello", "web"):
            core.delete_namespaced_pod(name, "default", grace_period_seconds=0)
        core.delete_namespaced_service("web", "default")
