"""The chart for real (issue 9 item 3): `helm install` runs the operator image in a pod on the
real node (webhook with the chart's own certificates, RBAC as the chart's ServiceAccount, leader
election), `helm test` passes (this release's webhook denies a known-bad PDDeployment, submitted
with server-side dry-run, with its rule), kubectl sees the same rejection, the operator in the
pod reconciles an accepted PDDeployment, and `helm uninstall` removes what the chart made.

The operator image comes from the tier's `real_images` fixture (`pdctl dev images build`).
The release (tests/realnode/release.py) is confined to this test's namespace
(operator.watchNamespaces: reconciliation and both webhook configurations), so other operators
and releases on the same cluster are not disturbed; the chart installs no CRD
(crds.enabled=false): the tier applies crds/. With PD_REALNODE_REUSE=1 the tier's fixture
reuses a running real-node cluster (tests/realnode/conftest.py).
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest
import yaml

from pd_dev.devcluster import realnode as rn
from pd_operator import __version__
from tests.helpers import wait_for
from tests.realnode.release import Release, ensure_crd

pytestmark = [pytest.mark.realnode, pytest.mark.cluster, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "deploy" / "examples"
IMAGE = f"ghcr.io/pd-operator/pd-operator:{__version__}"
ACCEPTED = "llama-3.1-8b-basic"


def _example(kind: str, name: str, namespace: str) -> tuple[str, str]:
    obj = yaml.safe_load((EXAMPLES / kind / f"{name}.yaml").read_text())
    obj["metadata"]["namespace"] = namespace
    return obj["metadata"]["name"], json.dumps(obj)


@pytest.fixture
def operator_image(real_kubectl, real_images) -> str:
    node = json.loads(real_kubectl("get", "node", rn.NODE_NAME, "-o", "json").stdout)
    names = {n for img in node["status"].get("images") or [] for n in img.get("names") or []}
    assert IMAGE in names, f"{IMAGE} is not on {rn.NODE_NAME} after pdctl dev images build"
    return IMAGE


@pytest.fixture
def chart_namespace(real_kubectl):
    ns = f"pdo-chart-{secrets.token_hex(3)}"
    real_kubectl("create", "namespace", ns)
    try:
        yield ns
    finally:
        real_kubectl("delete", "namespace", ns, "--wait=false", check=False)


# func_only: the test's own time; the tier's session fixtures (packages, images: ~15 min on a
# machine with nothing cached) are bounded by their own timeouts and run in whichever test is first
@pytest.mark.timeout(900, func_only=True)
def test_chart_installs_on_the_real_node_and_helm_test_passes(
        real_cluster, real_kubectl, operator_image, chart_namespace):
    kubectl, ns = real_kubectl, chart_namespace
    ensure_crd(kubectl)
    release = Release(real_cluster.kubeconfig, kubectl, ns)
    try:
        release.install()
        manifest = [d for d in yaml.safe_load_all(release.helm("get", "manifest",
                                                               release.name).stdout) if d]
        cluster_scoped = [(d["kind"], d["metadata"]["name"]) for d in manifest
                          if "namespace" not in d["metadata"]]

        # the operator runs the image on the real node, as the chart's ServiceAccount
        pods = json.loads(kubectl("get", "pods", "-n", ns, "-l",
                                  "app.kubernetes.io/component=operator", "-o",
                                  "json").stdout)["items"]
        assert len(pods) == 1, release.diagnose()
        pod = pods[0]
        assert pod["spec"]["nodeName"] == rn.NODE_NAME
        assert pod["spec"]["serviceAccountName"] == release.fullname
        assert pod["spec"]["containers"][0]["image"] == operator_image
        ready = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
        assert ready["Ready"] == "True"  # /healthz over TLS: the chart's certificate serves
        # leader election with the chart's Role
        lease = wait_for("the leader Lease", lambda: json.loads(kubectl(
            "get", "lease", f"{release.fullname}-leader", "-n", ns, "-o",
            "json").stdout)["spec"].get("holderIdentity"), timeout=60,
            diagnose=release.diagnose)
        assert pod["metadata"]["name"] in lease

        # helm test: the hook Pod's dry run is denied by this release's webhook
        out = release.helm("test", release.name, "--logs", "--timeout", "180s")
        assert f"PASS: denied by {release.webhook} with TP-DIVISIBLE" in out.stdout, out.stdout
        left = kubectl("get", "pods,serviceaccounts,roles,rolebindings,configmaps", "-n", ns,
                       "-l", "app.kubernetes.io/component=test", "-o", "name").stdout.split()
        # only the Pod stays after a pass (for --logs), Succeeded
        assert left == [f"pod/{release.fullname}-admission-test"], left
        phase = kubectl("get", left[0], "-n", ns, "-o", "jsonpath={.status.phase}").stdout
        assert phase == "Succeeded"

        # kubectl sees the same rejection, through the API server and this webhook
        name, bad = _example("rejected", "tp-not-divisible", ns)
        denied = kubectl("apply", "-f", "-", input=bad, check=False)
        assert denied.returncode != 0 and "[TP-DIVISIBLE]" in denied.stderr, denied.stderr
        assert release.webhook in denied.stderr, denied.stderr
        assert kubectl("get", "pdd", name, "-n", ns, check=False).returncode != 0

        # the operator in the pod reconciles an accepted PDDeployment (RBAC, leader)
        name, good = _example("accepted", ACCEPTED, ns)
        kubectl("apply", "-f", "-", input=good)
        wait_for(f"{name}'s children and status, from the operator pod", lambda: (
            kubectl("get", "statefulset", f"{name}-prefill", "-n", ns,
                    check=False).returncode == 0
            and (json.loads(kubectl("get", "pdd", name, "-n", ns, "-o", "json").stdout)
                 .get("status") or {}).get("phase")), timeout=90, diagnose=release.diagnose)
        logs = kubectl("logs", "-n", ns, pod["metadata"]["name"]).stdout
        assert "forbidden" not in logs.lower(), logs[-4000:]
        # every child applied at the first attempt (the router RoleBinding after its Role)
        assert "children not applied" not in logs, logs[-4000:]
        kubectl("delete", "pdd", name, "-n", ns, "--wait=true", "--timeout=60s")

        release.uninstall()
        for kind, obj_name in cluster_scoped:
            gone = kubectl("get", kind, obj_name, check=False)
            assert gone.returncode != 0 and "NotFound" in gone.stderr, f"{kind}/{obj_name} left"
    finally:
        release.uninstall()
