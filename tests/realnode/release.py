"""A Helm release of charts/pd-operator on the real-node cluster, confined to one namespace
(operator.watchNamespaces: reconciliation and both webhook configurations), so releases of
several tests, or a development operator, do not meet; and the cluster's shared CRD."""

from __future__ import annotations

import json
import secrets
import subprocess
from pathlib import Path

import yaml

from pd_dev.devcluster import build
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "pd-operator"
REALNODE_VALUES = CHART / "ci" / "realnode-values.yaml"
KNOWN_BAD = ROOT / "deploy" / "examples" / "rejected" / "tp-not-divisible.yaml"
GROUP = "serving.pd-operator.dev"
CRD_NAME = f"pddeployments.{GROUP}"


class Release:
    def __init__(self, kubeconfig: Path, kubectl, namespace: str | None = None):
        self.kubeconfig, self.kubectl = kubeconfig, kubectl
        self.ns = namespace or f"pdo-{secrets.token_hex(3)}"
        self.name = f"pdo-{secrets.token_hex(3)}"
        self.fullname = f"{self.name}-pd-operator"
        self.webhook = f"validate.{self.fullname}.{GROUP}"
        self.installed = False

    def helm(self, *args: str, check: bool = True,
             timeout: float = 300) -> subprocess.CompletedProcess:
        out = subprocess.run([str(build.binary_path("helm")), f"--kubeconfig={self.kubeconfig}",
                              "-n", self.ns, *args], capture_output=True, text=True,
                             timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({out.returncode}):\n"
                                 f"{out.stderr}{out.stdout}\n{self.diagnose()}")
        return out

    def diagnose(self, pdd: str | None = None) -> str:
        k = self.kubectl
        parts = [("pods", k("get", "pods", "-n", self.ns, "-o", "wide", check=False).stdout),
                 ("events", k("get", "events", "-n", self.ns, "--sort-by=.lastTimestamp",
                              check=False).stdout[-3000:])]
        if pdd:
            parts.append(("pdd", k("get", "pdd", pdd, "-n", self.ns, "-o", "yaml",
                                   check=False).stdout[-3000:]))
            for role in ("prefill", "decode"):
                log = k("logs", "-n", self.ns, f"{pdd}-{role}-0", "--tail=30", check=False)
                parts.append((f"{role}-0 log", log.stdout + log.stderr))
        log = k("logs", "-n", self.ns, f"deployment/{self.fullname}", "--tail=60", check=False)
        parts.append(("operator log", log.stdout + log.stderr))
        return "\n".join(f"--- {title}\n{text}" for title, text in parts)

    def install(self) -> None:
        self.installed = True
        self.helm("install", self.name, str(CHART), "-f", str(REALNODE_VALUES),
                  "--set", f"operator.watchNamespaces={{{self.ns}}}",
                  "--set", "crds.enabled=false", "--wait", "--timeout", "180s")
        self.wait_webhook_serving()

    def wait_webhook_serving(self, timeout: float = 120) -> None:
        """`helm install --wait` returns once the operator pod is Ready; the webhook Service's
        endpoints and kube-proxy's rules follow a moment later, and until then the API server
        answers "failed calling webhook ... connection refused". The release serves once a
        known-bad PDDeployment (server-side dry run) is denied by this release's webhook."""
        bad = yaml.safe_load(KNOWN_BAD.read_text())
        bad["metadata"]["namespace"] = self.ns
        body = json.dumps(bad)

        def denied_here() -> bool:
            out = self.kubectl("apply", "--dry-run=server", "-f", "-", input=body, check=False)
            return out.returncode != 0 and self.webhook in out.stderr \
                and "[TP-DIVISIBLE]" in out.stderr

        wait_for(f"{self.webhook} to answer through its Service", denied_here, timeout=timeout,
                 diagnose=self.diagnose)

    def uninstall(self) -> None:
        if self.installed:
            self.helm("uninstall", self.name, "--wait", "--timeout", "120s", check=False)
            self.installed = False


def ensure_crd(kubectl) -> None:
    """The cluster's shared CRD, as crds/ has it now (a reused cluster may hold an older one,
    whose schema would prune the fields added since)."""
    kubectl("apply", "--server-side", "--force-conflicts", "-f",
            str(ROOT / "crds" / "pddeployment.yaml"))
    wait_for("the CRD Established", lambda: kubectl(
        "wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=20s",
        check=False).returncode == 0, timeout=90)
    wait_for("pddeployments served", lambda: kubectl(
        "get", CRD_NAME, "-A", "-o", "name", check=False).returncode == 0, timeout=60)
