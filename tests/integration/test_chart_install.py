"""`helm install` of charts/pd-operator into the local control plane, then the chart's wiring is
proved end to end with the operator running on the host:

* the chart is installed with `webhook.url=https://127.0.0.1:PORT` (its webhook configurations
  scoped to this test's namespace, so other tests never call it);
* `pdctl operator run` starts on the host with the certificate and key read back from the
  Secret the chart made (without --local-webhook it registers no configuration of its own);
* a rejected example fails with TP-DIVISIBLE: the API server called the operator through the
  chart's webhook configuration and trusted it through the chart's CA bundle; an accepted
  example is admitted;
* `helm uninstall` removes the chart's cluster-scoped objects;
* second test: the operator *authenticated as the chart's ServiceAccount* (a TokenRequest
  token) reconciles an accepted example, so the chart's ClusterRole and leader-election Role
  authorize every request (router Role included: RBAC lets the operator create it only because
  the chart grants it the same pod permissions).

The CRD is shared by every cluster test, so the chart is installed with crds.enabled=false (the
test makes sure the CRD from crds/ is there) and the chart's CRD template is checked with a
server-side dry run instead.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import free_port, pdctl, stop_group, wait_for

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "pd-operator"
EXAMPLES = ROOT / "deploy" / "examples"
CRD_NAME = "pddeployments.serving.pd-operator.dev"
CRD_TEMPLATE = "templates/crd-serving.pd-operator.dev_pddeployments.yaml"
ACCEPTED_FILE = "llama-3.1-8b-basic"
ACCEPTED = yaml.safe_load((EXAMPLES / "accepted" / f"{ACCEPTED_FILE}.yaml").read_text())[
    "metadata"]["name"]


def _example(kind: str, name: str, namespace: str) -> str:
    obj = yaml.safe_load((EXAMPLES / kind / f"{name}.yaml").read_text())
    obj["metadata"]["namespace"] = namespace
    return json.dumps(obj)


def _sa_kubeconfig(admin: str, token: str, path: Path) -> Path:
    """The admin kubeconfig's cluster, with the ServiceAccount's bearer token as the user."""
    cfg = yaml.safe_load(Path(admin).read_text())
    cfg["users"] = [{"name": "chart-sa", "user": {"token": token}}]
    for ctx in cfg["contexts"]:
        ctx["context"]["user"] = "chart-sa"
    path.write_text(yaml.safe_dump(cfg))
    path.chmod(0o600)
    return path


class _Install:
    """The chart installed into the test namespace with webhook.url -> 127.0.0.1:port and its
    webhook configurations scoped to that namespace; the operator started on the host."""

    def __init__(self, tmp: Path, dev_cluster, kubeconfig: str, kubectl, namespace: str):
        self.tmp, self.kubeconfig, self.kubectl, self.ns = tmp, kubeconfig, kubectl, namespace
        self.helm_bin = dev_cluster.helm_path()
        self.release = f"pdc-{secrets.token_hex(3)}"
        self.fullname = f"{self.release}-pd-operator"
        self.port = free_port()
        self.log = tmp / "operator.log"
        self.operator: subprocess.Popen | None = None
        self.cluster_scoped: list[tuple[str, str]] = []

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run([self.helm_bin, f"--kubeconfig={self.kubeconfig}", *args],
                             capture_output=True, text=True, timeout=120)
        if check and out.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{out.stderr}{out.stdout}")
        return out

    def install(self) -> None:
        kubectl = self.kubectl
        # The shared CRD: present (other cluster tests install it too), and the chart's copy
        # of it is accepted by the API server as an update of it.
        if kubectl("get", "crd", CRD_NAME, check=False).returncode != 0:
            kubectl("apply", "--server-side", "--force-conflicts",
                    "-f", str(ROOT / "crds" / "pddeployment.yaml"))
        kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")
        crd = self.helm("template", self.release, str(CHART), "-n", self.ns, "--kube-version",
                        "1.36.3", "--show-only", CRD_TEMPLATE).stdout
        kubectl("apply", "--dry-run=server", "-f", "-", input=crd)

        values = self.tmp / "values.yaml"
        values.write_text(yaml.safe_dump({
            "crds": {"enabled": False},
            "webhook": {
                "url": f"https://127.0.0.1:{self.port}",
                "namespaceSelector": {"matchExpressions": [{
                    "key": "kubernetes.io/metadata.name", "operator": "In",
                    "values": [self.ns]}]},
            },
        }))
        self.helm("install", self.release, str(CHART), "-n", self.ns, "-f", str(values))
        manifest = [d for d in yaml.safe_load_all(
            self.helm("get", "manifest", self.release, "-n", self.ns).stdout) if d]
        self.cluster_scoped = [(d["kind"], d["metadata"]["name"]) for d in manifest
                               if "namespace" not in d["metadata"]]
        assert {k for k, _ in self.cluster_scoped} == {
            "ClusterRole", "ClusterRoleBinding", "ValidatingWebhookConfiguration",
            "MutatingWebhookConfiguration"}, self.cluster_scoped

        # The chart's certificate, read back from the cluster; its CA is in both configurations.
        secret = json.loads(kubectl("get", "secret", f"{self.fullname}-webhook-tls", "-n",
                                    self.ns, "-o", "json").stdout)
        for key in ("tls.crt", "tls.key"):
            (self.tmp / key).write_bytes(base64.b64decode(secret["data"][key]))
        for kind in ("validatingwebhookconfiguration", "mutatingwebhookconfiguration"):
            cfg = json.loads(kubectl("get", kind, f"{self.fullname}.serving.pd-operator.dev",
                                     "-o", "json").stdout)
            assert cfg["webhooks"][0]["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]

    def start_operator(self, kubeconfig: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != "POD_NAMESPACE"}
        env.update(KUBECONFIG=kubeconfig, PYTHONUNBUFFERED="1")
        # Without --local-webhook: serve with the given certificate, register nothing.
        self.operator = subprocess.Popen(
            [pdctl(), "operator", "run", "--kubeconfig", kubeconfig, "-n", self.ns,
             "--webhook-addr", "127.0.0.1", "--webhook-port", str(self.port),
             "--webhook-certfile", str(self.tmp / "tls.crt"),
             "--webhook-keyfile", str(self.tmp / "tls.key"),
             "--metrics-port", "0", "--lease-name", f"{self.fullname}-leader",
             "--lease-namespace", self.ns, "--lease-duration", "5"],
            stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=env,
            start_new_session=True)

    def alive(self) -> None:
        assert self.operator is not None and self.operator.poll() is None, \
            f"operator exited:\n{self.log.read_text()}"

    def stop_operator(self) -> None:
        if self.operator is not None:
            stop_group(self.operator, grace_s=20, kill_wait_s=10)

    def uninstall(self) -> None:
        self.helm("uninstall", self.release, "-n", self.ns, "--wait", "--timeout", "60s",
                  check=False)


@pytest.fixture
def chart(tmp_path, dev_cluster, kubeconfig, kubectl, namespace):
    inst = _Install(tmp_path, dev_cluster, kubeconfig, kubectl, namespace)
    try:
        inst.install()
        yield inst
    except BaseException:
        if inst.log.exists():  # the operator's side of a failure
            print(f"--- operator log (tail) ---\n{inst.log.read_text()[-6000:]}")
        raise
    finally:
        inst.stop_operator()
        inst.uninstall()


def test_chart_webhook_configuration_reaches_the_operator(chart, kubeconfig, kubectl,
                                                          namespace):
    started = time.monotonic()
    chart.start_operator(kubeconfig)
    bad = _example("rejected", "tp-not-divisible", namespace)

    def denied() -> str | None:
        chart.alive()
        out = kubectl("apply", "-f", "-", input=bad, check=False)
        return out.stderr if out.returncode != 0 and "TP-DIVISIBLE" in out.stderr else None
    stderr = wait_for("the chart's webhook to reject tp-not-divisible", denied, 60)
    # the denial came through the chart's configuration (its webhook name), not another one
    assert "admission webhook" in stderr and \
        f"validate.{chart.fullname}.serving.pd-operator.dev" in stderr, stderr
    assert kubectl("get", "pdd", "tp-not-divisible", "-n", namespace,
                   check=False).returncode != 0
    # accepted: admitted through both webhooks (mutate, then validate)
    kubectl("apply", "-f", "-", input=_example("accepted", ACCEPTED_FILE, namespace))
    assert kubectl("get", "pdd", ACCEPTED, "-n", namespace).returncode == 0
    chart.alive()

    chart.stop_operator()
    chart.uninstall()
    for kind, name in chart.cluster_scoped:
        out = kubectl("get", kind, name, check=False)
        assert out.returncode != 0 and "NotFound" in out.stderr, f"{kind}/{name} is left"
    assert chart.helm("status", chart.release, "-n", namespace, check=False).returncode != 0
    print(f"webhook wiring, install -> uninstall: {time.monotonic() - started:.1f}s")


def test_chart_rbac_lets_the_operator_reconcile(chart, tmp_path, kubeconfig, kubectl,
                                                 namespace):
    token = kubectl("create", "token", chart.fullname, "-n", namespace,
                    "--duration=10m").stdout.strip()
    chart.start_operator(str(_sa_kubeconfig(kubeconfig, token, tmp_path / "sa.kubeconfig")))
    # the webhook needs no API access: wait for it, then apply an accepted example
    good = _example("accepted", ACCEPTED_FILE, namespace)
    wait_for("the webhook to admit", lambda: (chart.alive(), kubectl(
        "apply", "-f", "-", input=good, check=False).returncode == 0)[1], 60)

    def children() -> set[str] | None:
        chart.alive()
        items = json.loads(kubectl(
            "get", "statefulsets,deployments,roles,rolebindings,configmaps", "-n", namespace,
            "-l", f"app.kubernetes.io/instance={ACCEPTED}", "-o", "json").stdout)["items"]
        kinds = {i["kind"] for i in items}
        return kinds if {"StatefulSet", "Deployment", "Role", "RoleBinding",
                         "ConfigMap"} <= kinds else None
    wait_for(f"the children of {ACCEPTED}, applied as the chart's ServiceAccount",
              children, 45)
    wait_for("status written by the operator", lambda: (json.loads(kubectl(
        "get", "pdd", ACCEPTED, "-n", namespace, "-o", "json").stdout).get("status")
        or {}).get("phase"), 30)
    lease = json.loads(kubectl("get", "lease", f"{chart.fullname}-leader", "-n", namespace,
                               "-o", "json").stdout)
    assert lease["spec"]["holderIdentity"]
    text = chart.log.read_text()
    for word in ("Forbidden", "forbidden", " 403"):
        assert word not in text, f"the chart's RBAC refused a request:\n{text[-4000:]}"


def test_chart_refuses_a_webhook_configuration_it_does_not_own(dev_cluster, kubeconfig, kubectl,
                                                               namespace):
    """A development `pdctl operator run --local-webhook` registers
    pd-operator.serving.pd-operator.dev, the name of a release whose full name is pd-operator:
    the chart fails with the reason instead of helm's "cannot be imported"."""
    release = f"pdg-{secrets.token_hex(3)}"
    name = f"{release}-pd-operator.serving.pd-operator.dev"
    kubectl("apply", "-f", "-", input=json.dumps({  # no webhooks: nothing is ever called
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "pd-operator"}},
        "webhooks": []}))
    try:
        out = subprocess.run([dev_cluster.helm_path(), f"--kubeconfig={kubeconfig}", "install",
                              release, str(CHART), "-n", namespace, "--dry-run=server",
                              "--set", "crds.enabled=false"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode != 0
        assert f'"{name}" already exists and is not this release\'s' in out.stderr, out.stderr
        assert "pdctl operator run --local-webhook" in out.stderr
    finally:
        kubectl("delete", "validatingwebhookconfiguration", name, check=False)
