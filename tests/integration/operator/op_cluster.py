"""Helpers for the operator's cluster tests: run `pdctl operator run` as a process, wait for
conditions with deadlines, extra kwok GPU nodes, the CRD."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from tests.helpers import EXAMPLES, REPO, free_port, pdctl, wait_for

CRD = REPO / "crds" / "pddeployment.yaml"
GROUP = "serving.pd-operator.dev"


class Operator:
    """`pdctl operator run --local-webhook` scoped to one namespace (webhook included), for
    fake nodes (`--kv-path-verification=off`)."""

    def __init__(self, kubeconfig: str, namespace: str, log_dir: Path,
                 lease_duration: float = 4.0, extra: tuple[str, ...] = ()):
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.log_dir = log_dir
        self.lease_duration = lease_duration
        self.extra = extra
        self.metrics_port = free_port()
        self.config_name = f"pd-op-{namespace}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> Operator:
        self.starts += 1
        self.log = self.log_dir / f"operator-{self.starts}.log"
        env = dict(os.environ, KUBECONFIG=self.kubeconfig, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [pdctl(), "operator", "run", "--kubeconfig", self.kubeconfig,
             "-n", self.namespace, "--local-webhook", "--webhook-port", "0",
             "--webhook-config-name", self.config_name,
             "--metrics-port", str(self.metrics_port),
             "--lease-namespace", self.namespace, "--lease-duration", str(self.lease_duration),
             # fake (kwok) nodes: the pods run nothing, so no KV path can be proven; builtin
             # pools become Ready with KVPathVerified=Unknown (VerificationDisabled)
             "--kv-path-verification=off", *self.extra],
            stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=env,
            start_new_session=True)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=5) as r:
            return r.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        total = 0.0
        for line in self.metrics().splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total


@contextmanager
def running_operator(kubeconfig: str, kubectl, namespace: str, log_dir: Path) -> Iterator[Operator]:
    """An Operator started and its webhook answering; after: stopped, its webhook configurations
    deleted and the tail of its output printed."""
    op = Operator(kubeconfig, namespace, log_dir).start()
    try:
        webhook_probe(kubectl, namespace)
        yield op
    finally:
        op.stop()
        for kind in ("validatingwebhookconfiguration", "mutatingwebhookconfiguration"):
            kubectl("delete", kind, op.config_name, "--ignore-not-found", check=False)
        print(op.output()[-4000:])


def get_json(kubectl, *args: str) -> dict[str, Any]:
    return json.loads(kubectl("get", *args, "-o", "json").stdout)


def pdd(kubectl, ns: str, name: str) -> dict[str, Any]:
    return get_json(kubectl, "pddeployment", name, "-n", ns)


def condition(obj: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == ctype:
            return c
    return None


def is_ready(obj: dict[str, Any]) -> bool:
    st = obj.get("status") or {}
    c = condition(obj, "Ready")
    return bool(st.get("phase") == "Ready" and c and c["status"] == "True"
                and st.get("observedGeneration") == obj["metadata"]["generation"])


def wait_ready(kubectl, ns: str, names: list[str], timeout: float = 120) -> dict[str, dict]:
    def check():
        items = get_json(kubectl, "pddeployments", "-n", ns)["items"]
        by = {i["metadata"]["name"]: i for i in items}
        missing = [n for n in names if n not in by or not is_ready(by[n])]
        return by if not missing else None
    return wait_for(f"PDDeployments Ready: {names}", check, timeout=timeout, every=1)


def load_example(kind: str, name: str) -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / kind / f"{name}.yaml").read_text())


def install_crd(kubectl) -> None:
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    # A brand-new CRD: `kubectl wait` can run before the object is readable ("not found"), and
    # Established comes before the resource is in discovery; wait for both, retrying each.
    wait_for("CRD Established", lambda: kubectl(
        "wait", "--for=condition=Established", f"crd/pddeployments.{GROUP}",
        "--timeout=30s").returncode == 0, timeout=90)
    wait_for("pddeployments served", lambda: kubectl(
        "get", f"pddeployments.{GROUP}", "-A", "-o", "name").returncode == 0, timeout=60)


def extra_nodes(prefix: str, products: dict[str, int], pods: str = "256") -> list[dict]:
    """kwok-managed GPU nodes (built with the control plane's own node builder)."""
    from pd_dev.devcluster import nodes

    out = []
    for i, (product, gpus) in enumerate(sorted(products.items())):
        spec = nodes.NodeSpec(f"{prefix}-{i}", product, 81559, nodes.ZONES[i % 2], gpus)
        obj = nodes.node_object(spec, pods=pods)
        obj["metadata"]["labels"]["pd-operator.dev/test-node"] = prefix
        out.append(obj)
    return out


def webhook_probe(kubectl, ns: str, timeout: float = 60) -> None:
    """Wait until the API server calls our validating webhook (dry-run of a rejected object)."""
    bad = load_example("rejected", "tp-not-divisible")
    bad["metadata"]["namespace"] = ns

    def denied():
        out = kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(bad),
                      check=False)
        return out.returncode != 0 and "admission webhook" in out.stderr and \
            "TP-DIVISIBLE" in out.stderr
    wait_for("the validating webhook to be called", denied, timeout=timeout)
