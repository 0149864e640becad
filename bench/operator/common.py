"""Shared pieces of the operator benchmarks: the cluster, the operator process, a small spec."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

sys.path.insert(0, str(REPO))  # the tests' shared helpers (free port, the sample spec)

from tests.helpers import LLAMA_8B, free_port, sample_pdd  # noqa: E402


def small(name: str, namespace: str) -> dict[str, Any]:
    """The benchmarks' PDDeployment: the tests' sample spec at TP 1, one replica each."""
    one = {"replicas": 1, "tensorParallelSize": 1}
    return sample_pdd(name=name, namespace=namespace, model={**LLAMA_8B, "dtype": "bfloat16"},
                      engine={"type": "vllm"}, prefill=one, decode=one, router={"replicas": 1})


def kubeconfig(arg: str | None) -> str:
    if arg:
        return arg
    if os.environ.get("KUBECONFIG"):
        return os.environ["KUBECONFIG"]
    from pd_dev.devcluster import cluster

    return str(cluster.layout_for().kubeconfig)


def kubectl_bin() -> str:
    try:
        from pd_dev.devcluster import build

        p = build.binary_path("kubectl")
        if Path(p).exists():
            return str(p)
    except Exception:  # noqa: BLE001
        pass
    return "kubectl"


def kubectl(kc: str, *args: str, input: str | None = None, check: bool = True,
            timeout: float = 600) -> subprocess.CompletedProcess:
    out = subprocess.run([kubectl_bin(), f"--kubeconfig={kc}", *args], input=input,
                         capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args[:3])}: {out.stderr[-2000:]}")
    return out


class OperatorProcess:
    def __init__(self, kc: str, namespaces: list[str], log: Path, extra: tuple[str, ...] = ()):
        self.config_name = f"pd-bench-{namespaces[0]}"
        self.metrics_port = free_port()
        args = [str(Path(sys.executable).parent / "pdctl"), "operator", "run",
                "--kubeconfig", kc, "--local-webhook", "--webhook-port", "0",
                "--webhook-config-name", self.config_name, "--metrics-port",
                str(self.metrics_port), "--no-leader-election", *extra]
        for ns in namespaces:
            args += ["-n", ns]
        self.log = log
        self.proc = subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                     env=dict(os.environ, KUBECONFIG=kc, PYTHONUNBUFFERED="1"),
                                     start_new_session=True)

    def peak_rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def machine() -> dict[str, Any]:
    load = os.getloadavg()
    return {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "loadavg_at_start": [round(x, 2) for x in load]}


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def wait(what: str, fn, timeout: float, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(every)
