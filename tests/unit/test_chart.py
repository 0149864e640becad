"""The Helm chart (charts/pd-operator), rendered offline with `helm template`: no cluster needed.

Needs the helm binary the dev tooling caches (pd_dev.devcluster.build.binary_path); CI
builds it before the tests run, so the module is skipped only when it is absent.
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from pd_dev import chart_values, generate
from pd_dev.devcluster import build
from pd_operator import handlers
from pd_operator.cli import operator_cmds
from pd_operator.render import Owner, render
from pd_operator.validate import parse_object, validate_spec
from pd_operator.webhook import configs

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "pd-operator"
EXAMPLES = ROOT / "deploy" / "examples"
KUBE_VERSION = "1.36.3"  # helm template's offline default (1.20) is below the chart's floor
RELEASE, NS = "rel", "pd-system"
REALNODE = CHART / "ci" / "realnode-values.yaml"

HELM = build.binary_path("helm")
pytestmark = pytest.mark.skipif(
    not HELM.exists(), reason=f"helm binary absent at {HELM} (build it: pdctl dev cluster up)")


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=60)
    if check and out.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{out.stderr}{out.stdout}")
    return out


def template(*sets: str, check: bool = True, tests: bool = False,
             values: tuple[Path, ...] = ()) -> subprocess.CompletedProcess:
    """`helm template`; the `helm test` hooks only with tests=True (they are not installed)."""
    args = ["template", RELEASE, str(CHART), "--namespace", NS, "--kube-version", KUBE_VERSION]
    args += [] if tests else ["--skip-tests"]
    for f in values:
        args += ["-f", str(f)]
    for s in sets:
        args += ["--set", s]
    return helm(*args, check=check)


def objects(*sets: str, tests: bool = False,
            values: tuple[Path, ...] = ()) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(template(*sets, tests=tests, values=values).stdout)
            if d]


def one(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind
             and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name or ''}: {len(found)} rendered"
    return found[0]


@pytest.fixture(scope="module")
def default() -> list[dict[str, Any]]:
    return objects()


@pytest.fixture(scope="module")
def cert_manager() -> list[dict[str, Any]]:
    return objects("certManager.enabled=true")


def _container(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def _arg(container: dict[str, Any], flag: str) -> str | None:
    for a in container["args"]:
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


# ------------------------------------------------------------------------ generated files
def test_generated_files_are_in_sync():
    stale = [str(p.relative_to(ROOT)) for p in generate.stale(chart_values.outputs())]
    assert not stale, f"run: make generate  (stale: {stale})"


def test_values_yaml_is_the_table_and_every_key_is_commented():
    text = (CHART / "values.yaml").read_text()
    assert yaml.safe_load(text) == chart_values.defaults()
    lines = text.splitlines()
    documented = []
    for i, line in enumerate(lines):
        if line.lstrip().startswith("# Default:"):
            assert lines[i - 1].lstrip().startswith("#"), f"no description above {lines[i + 1]}"
            documented.append(lines[i + 1].split(":")[0].strip())
    assert documented == [v.key.rsplit(".", 1)[-1] for v in chart_values.VALUES]
    assert all(len(v.description) > 40 for v in chart_values.VALUES)


def test_every_value_is_used_by_a_template():
    text = "".join(p.read_text() for p in (CHART / "templates").rglob("*") if p.is_file())
    unused = [v.key for v in chart_values.VALUES if f".Values.{v.key}" not in text]
    assert not unused, f"values no template reads: {unused}"


def test_helm_lint_passes_for_each_scenario():
    helm("lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION)
    helm("lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION,
         "--set", "certManager.enabled=true", "--set", "webhook.url=https://127.0.0.1:9443")
    helm("lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION, "-f", str(REALNODE),
         "--set", "operator.watchNamespaces={a,b}")


# --------------------------------------------------------------------------------- schema
@pytest.mark.parametrize("setting, message", [
    ("operator.replica=3", "additional properties 'replica' not allowed"),
    ("webhok.port=1", "additional properties 'webhok' not allowed"),
    ("webhook.timeoutSeconds=10", "maximum"),
    ("webhook.failurePolicy=Retry", "Fail"),
])
def test_schema_rejects_misspelt_or_invalid_values(setting, message):
    out = template(setting, check=False)
    assert out.returncode != 0, f"--set {setting} rendered"
    assert message in out.stderr, out.stderr


def test_kube_version_floor():
    out = helm("template", RELEASE, str(CHART), "--kube-version", "1.28.0", check=False)
    assert out.returncode != 0 and "kubeVersion" in out.stderr


def test_helm_template_works_offline_without_kube_version():
    out = helm("template", RELEASE, str(CHART), "--namespace", NS)
    assert any(d and d["kind"] == "Deployment" for d in yaml.safe_load_all(out.stdout))


def test_notes_name_the_printer_columns():
    from pd_operator.api import crd

    lines = (CHART / "templates" / "NOTES.txt").read_text().splitlines()
    plain = next(x for x in lines if "kubectl get pdd -A" in x and "wide" not in x)
    wide = next(x for x in lines if "kubectl get pdd -A -o wide" in x)
    said, said_wide = plain.split("#", 1)[1].lower(), wide.split("#", 1)[1].lower()
    priority = {c["name"]: c.get("priority", 0) for c in crd.PRINTER_COLUMNS}
    assert {n for n, p in priority.items() if p == 0} == {"Phase", "P-Ready", "D-Ready", "Age"}
    assert {n for n, p in priority.items() if p == 1} == {"Model", "Hash"}
    assert "phase" in said and "prefill/decode ready" in said and "age" in said
    assert "model" in said_wide and "hash" in said_wide
    assert "verdict" not in said + said_wide  # verdicts are in status, not a column


# ---------------------------------------------------------------------------- webhooks
def _hooks(objs):
    return {kind: one(objs, kind)["webhooks"] for kind in
            ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration")}


def test_webhook_configurations_match_the_operator(default):
    expected = {
        "ValidatingWebhookConfiguration": configs.validating("https://x", b"ca")["webhooks"][0],
        "MutatingWebhookConfiguration": configs.mutating("https://x", b"ca")["webhooks"][0],
    }
    svc = one(default, "Service", f"{RELEASE}-pd-operator-webhook")
    for kind, hooks in _hooks(default).items():
        assert len(hooks) == 1
        hook, want = hooks[0], expected[kind]
        for key in ("rules", "admissionReviewVersions", "sideEffects", "failurePolicy",
                    "matchPolicy", "timeoutSeconds"):
            assert hook[key] == want[key], (kind, key)
        assert hook["timeoutSeconds"] <= 5
        assert hook.get("reinvocationPolicy") == want.get("reinvocationPolicy")
        assert hook["name"].count(".") >= 2
        ref = hook["clientConfig"]["service"]
        assert (ref["name"], ref["namespace"], ref["port"]) == (svc["metadata"]["name"], NS, 443)
        assert ref["path"] == want["clientConfig"]["url"].removeprefix("https://x")
        assert "url" not in hook["clientConfig"]
        assert "namespaceSelector" not in hook  # empty value: every namespace


def test_webhook_service_reaches_the_webhook_port(default):
    svc = one(default, "Service", f"{RELEASE}-pd-operator-webhook")
    dep = one(default, "Deployment")
    container = _container(default)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert svc["spec"]["ports"] == [{"name": "https", "port": 443, "targetPort": "webhook",
                                     "protocol": "TCP"}]
    assert str(ports["webhook"]) == _arg(container, "--webhook-port") == "9443"
    assert svc["spec"]["selector"].items() <= \
        dep["spec"]["template"]["metadata"]["labels"].items()
    metrics = one(default, "Service", f"{RELEASE}-pd-operator-metrics")
    assert str(ports["metrics"]) == _arg(container, "--metrics-port") == "8080"
    assert metrics["spec"]["ports"][0]["targetPort"] == "metrics"


def test_webhook_settings_come_from_values():
    objs = objects("webhook.timeoutSeconds=2", "webhook.failurePolicy=Ignore",
                   "webhook.namespaceSelector.matchLabels.team=llm")
    for hooks in _hooks(objs).values():
        assert (hooks[0]["timeoutSeconds"], hooks[0]["failurePolicy"]) == (2, "Ignore")
        assert hooks[0]["namespaceSelector"] == {"matchLabels": {"team": "llm"}}


# ------------------------------------------------------------------------- certificates
def _handshake(ca_pem: str, crt_pem: str, key_pem: str, hostname: str, tmp: Path) -> None:
    """A real TLS handshake: server with the chart's certificate, client trusting its CA and
    checking `hostname` as the API server does. Raises ssl.SSLError on any mismatch."""
    (tmp / "tls.crt").write_text(crt_pem)
    (tmp / "tls.key").write_text(key_pem)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tmp / "tls.crt", tmp / "tls.key")
    client_ctx = ssl.create_default_context(cadata=ca_pem)
    a, b = socket.socketpair()
    errors: list[BaseException] = []

    def serve():
        try:
            with server_ctx.wrap_socket(a, server_side=True) as s:
                s.recv(1)
        except (ssl.SSLError, OSError) as exc:
            errors.append(exc)
    t = threading.Thread(target=serve)
    t.start()
    try:
        with client_ctx.wrap_socket(b, server_hostname=hostname) as c:
            c.sendall(b"x")
    finally:
        b.close()
        t.join(10)
        a.close()
    assert not t.is_alive()


def test_self_signed_secret_serves_the_service_names(default, tmp_path):
    secret = one(default, "Secret", f"{RELEASE}-pd-operator-webhook-tls")
    assert secret["type"] == "kubernetes.io/tls"
    assert set(secret["data"]) == {"ca.crt", "tls.crt", "tls.key"}
    pem = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    for hooks in _hooks(default).values():  # the same CA everywhere (one render, one CA)
        assert base64.b64decode(hooks[0]["clientConfig"]["caBundle"]).decode() == pem["ca.crt"]
    svc = f"{RELEASE}-pd-operator-webhook"
    for host in (svc, f"{svc}.{NS}", f"{svc}.{NS}.svc"):
        _handshake(pem["ca.crt"], pem["tls.crt"], pem["tls.key"], host, tmp_path)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(pem["ca.crt"], pem["tls.crt"], pem["tls.key"], f"{svc}.other.svc", tmp_path)
    volumes = one(default, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "webhook-tls", "secret": {"secretName": secret["metadata"]["name"]}} \
        in volumes
    container = _container(default)
    assert _arg(container, "--webhook-certfile") == "/etc/pd-operator/tls/tls.crt"
    assert _arg(container, "--webhook-keyfile") == "/etc/pd-operator/tls/tls.key"


def test_webhook_url_for_development(tmp_path):
    objs = objects("webhook.url=https://127.0.0.1:19443")
    for kind, hooks in _hooks(objs).items():
        path = "/validate" if kind.startswith("Validating") else "/mutate"
        assert hooks[0]["clientConfig"]["url"] == f"https://127.0.0.1:19443{path}"
        assert "service" not in hooks[0]["clientConfig"]
    secret = one(objs, "Secret")
    pem = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    _handshake(pem["ca.crt"], pem["tls.crt"], pem["tls.key"], "127.0.0.1", tmp_path)


def test_cert_manager_mode(cert_manager):
    kinds = {o["kind"] for o in cert_manager}
    assert "Secret" not in kinds
    issuers = {o["metadata"]["name"]: o for o in cert_manager if o["kind"] == "Issuer"}
    certs = {o["metadata"]["name"]: o for o in cert_manager if o["kind"] == "Certificate"}
    serving = certs[f"{RELEASE}-pd-operator-webhook"]
    ca_cert = next(c for c in certs.values() if c["spec"].get("isCA"))
    # the chain: self-signed Issuer -> CA Certificate -> CA Issuer -> serving Certificate
    assert "selfSigned" in issuers[ca_cert["spec"]["issuerRef"]["name"]]["spec"]
    ca_issuer = issuers[serving["spec"]["issuerRef"]["name"]]
    assert ca_issuer["spec"]["ca"]["secretName"] == ca_cert["spec"]["secretName"]
    svc = f"{RELEASE}-pd-operator-webhook"
    assert serving["spec"]["dnsNames"] == [svc, f"{svc}.{NS}", f"{svc}.{NS}.svc"]
    volumes = one(cert_manager, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "webhook-tls", "secret": {"secretName": serving["spec"]["secretName"]}} \
        in volumes
    for kind in ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"):
        cfg = one(cert_manager, kind)
        assert cfg["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == \
            f"{NS}/{serving['metadata']['name']}"
        assert "caBundle" not in cfg["webhooks"][0]["clientConfig"]


# -------------------------------------------------------------------------------- RBAC
def _resource(kind: str) -> str:
    low = kind.lower()
    return low[:-1] + "ies" if low.endswith("y") else low + "s"


def _group(api_version: str) -> str:
    return api_version.rpartition("/")[0]


def _grants(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]}


def _rendered_children() -> list[dict[str, Any]]:
    children = []
    for path in sorted((EXAMPLES / "accepted").glob("*.yaml")):
        pdd = parse_object(yaml.safe_load(path.read_text()))
        children += render(Owner(pdd.metadata["name"], "ns", "uid-1"),
                           validate_spec(pdd.spec)).children
    return children


CHILD_VERBS = set(handlers.CHILD_VERBS)  # derived from the calls: test_op_rbac.py
# kopf watches CRDs so that it serves PDDeployments whose CRD appears after it started, and
# lists namespaces when limited to some (-n).
KOPF_EXTRA = {(g, r, v) for g, r in (("apiextensions.k8s.io", "customresourcedefinitions"),
                                     ("", "namespaces")) for v in ("list", "watch")}


def test_cluster_role_covers_the_operator_and_grants_nothing_else(default):
    granted = _grants(one(default, "ClusterRole")["rules"])
    children = _rendered_children()
    kinds = {(_group(c["apiVersion"]), _resource(c["kind"])) for c in children}
    assert {k for _, _, _, _, k in handlers.CHILD_KINDS} == {c["kind"] for c in children}
    needed = {(g, r, v) for g, r in kinds for v in CHILD_VERBS}
    # the router Role the operator creates: it may only grant what it holds (no escalate/bind)
    role_rules = [r for c in children if c["kind"] == "Role" for r in c["rules"]]
    assert role_rules
    needed |= _grants(role_rules)
    leases = {t for t in _grants(handlers.RBAC_RULES) if t[1] == "leases"}
    needed |= _grants(handlers.RBAC_RULES) - leases
    missing = needed - granted
    assert not missing, f"the ClusterRole lacks {sorted(missing)}"
    extra = granted - needed - KOPF_EXTRA
    assert not extra, f"the ClusterRole grants more than the operator needs: {sorted(extra)}"
    assert not any(v in ("escalate", "bind", "impersonate", "*") for _, _, v in granted)


def test_leases_only_in_the_release_namespace(default):
    role = one(default, "Role")
    assert role["metadata"]["namespace"] == NS
    granted = _grants(role["rules"])
    leases = {t for t in _grants(handlers.RBAC_RULES) if t[1] == "leases"}
    assert granted == leases
    lease = _arg(_container(default), "--lease-name")
    for rule in role["rules"]:
        if set(rule["verbs"]) & {"get", "update"}:
            assert rule["resourceNames"] == [lease]
    binding = one(default, "RoleBinding")
    sa = one(default, "ServiceAccount")["metadata"]["name"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NS}]
    crb = one(default, "ClusterRoleBinding")
    assert crb["subjects"] == binding["subjects"]
    assert crb["roleRef"]["name"] == one(default, "ClusterRole")["metadata"]["name"]


def test_no_leader_election():
    objs = objects("leaderElection.enabled=false", "operator.replicas=1")
    assert "--no-leader-election" in _container(objs)["args"]
    assert not [o for o in objs if o["kind"] in ("Role", "RoleBinding", "PodDisruptionBudget")]


# ------------------------------------------------------------------ operator Deployment
def test_operator_deployment(default):
    dep = one(default, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    container = _container(default)
    assert dep["spec"]["replicas"] == 2
    assert container["image"] == "ghcr.io/pd-operator/pd-operator:0.1.0"
    assert container["command"] == ["pdctl"] and container["args"][:2] == ["operator", "run"]
    assert {"name": "POD_NAMESPACE",
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}} in container["env"]
    # kopf names itself from POD_ID; otherwise it looks up the user 65532, which the image's
    # passwd lacks (the operator exited at start on the real node)
    assert {"name": "POD_ID",
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in container["env"]
    # routers run the operator's own image (render/router.py reads this variable)
    assert {"name": "PD_OPERATOR_ROUTER_IMAGE", "value": container["image"]} in container["env"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "webhook",
                                               "scheme": "HTTPS"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert pod["serviceAccountName"] == one(default, "ServiceAccount")["metadata"]["name"]
    pdb = one(default, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["minAvailable"] == 1


def test_image_overrides():
    assert _container(objects("image.tag=dev"))["image"] == \
        "ghcr.io/pd-operator/pd-operator:dev"
    digest = "sha256:" + "a" * 64
    assert _container(objects("image.repository=reg.local/pdo", f"image.digest={digest}"))[
        "image"] == f"reg.local/pdo@{digest}"


# -------------------------------------------------------------------------------- CRD
def test_crd_is_the_generated_one(default):
    crd = one(default, "CustomResourceDefinition")
    source = yaml.safe_load((ROOT / "crds" / "pddeployment.yaml").read_text())
    assert crd["spec"] == source["spec"]
    assert crd["metadata"]["name"] == source["metadata"]["name"]
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert source["metadata"]["labels"].items() <= crd["metadata"]["labels"].items()


def test_crd_switches():
    assert "helm.sh/resource-policy" not in \
        one(objects("crds.keep=false"), "CustomResourceDefinition")["metadata"]["annotations"]
    assert not [o for o in objects("crds.enabled=false")
                if o["kind"] == "CustomResourceDefinition"]


def test_names_are_cut_to_63_characters():
    objs = objects("fullnameOverride=" + "x" * 70)
    for o in objs:
        if o["kind"] not in ("CustomResourceDefinition", "ValidatingWebhookConfiguration",
                             "MutatingWebhookConfiguration"):
            assert len(o["metadata"]["name"]) <= 63, o["metadata"]["name"]
    assert json.dumps(objs)  # rendered and parsed


# ---------------------------------------------------------------- operator NetworkPolicy
def test_network_policy_admits_only_the_webhook_and_metrics_ports(default):
    pol = one(default, "NetworkPolicy")
    dep = one(default, "Deployment")
    assert pol["spec"]["podSelector"]["matchLabels"] == \
        dep["spec"]["selector"]["matchLabels"]
    assert pol["spec"]["policyTypes"] == ["Ingress"]
    ports = [[p["port"] for p in rule["ports"]] for rule in pol["spec"]["ingress"]]
    assert ports == [["webhook"], ["metrics"]]
    named = {p["name"] for p in _container(default)["ports"]}
    assert {"webhook", "metrics"} <= named
    assert all("from" not in rule for rule in pol["spec"]["ingress"])  # default: any source


def test_network_policy_peers_and_switch():
    objs = objects("webhook.networkPolicy.from[0].ipBlock.cidr=10.0.0.0/24",
                   "metrics.enabled=false")
    (rule,) = one(objs, "NetworkPolicy")["spec"]["ingress"]
    assert rule["from"] == [{"ipBlock": {"cidr": "10.0.0.0/24"}}]
    assert not [o for o in objects("webhook.networkPolicy.enabled=false")
                if o["kind"] == "NetworkPolicy"]


def test_no_leader_election_with_several_replicas_is_refused():
    out = template("leaderElection.enabled=false", check=False)  # default: 2 replicas
    assert out.returncode != 0 and "leaderElection.enabled=false needs operator.replicas" \
        in out.stderr
    assert template("leaderElection.enabled=false", "operator.replicas=1").returncode == 0


def test_metrics_bind_where_the_chart_says(default):
    c = _container(default)
    assert _arg(c, "--metrics-addr") == "$(POD_IP)"
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert _arg(_container(objects("metrics.bindAddress=127.0.0.1")),
                "--metrics-addr") == "127.0.0.1"
    off = _container(objects("metrics.enabled=false"))
    assert _arg(off, "--metrics-port") == "0" and _arg(off, "--metrics-addr") is None


def test_forbidden_validation_policies_reach_the_operator(default):
    assert _arg(_container(default), "--forbid-validation-policies") is None
    c = _container(objects("validation.forbiddenPolicies={Disabled,Warn}"))
    flag = _arg(c, "--forbid-validation-policies")
    assert flag == "Disabled,Warn"
    # the operator accepts what the chart passes
    assert operator_cmds.forbidden_policies(flag) == frozenset({"Disabled", "Warn"})
    out = template("validation.forbiddenPolicies={Strict}", check=False)
    assert out.returncode != 0 and "forbiddenPolicies" in out.stderr


# ------------------------------------------------------------ namespaces a release watches
def test_watch_namespaces_scope_the_operator_and_its_webhooks(default):
    assert _arg(_container(default), "--namespace") is None
    assert all("namespaceSelector" not in h[0] for h in _hooks(default).values())
    objs = objects("operator.watchNamespaces={team-a,team-b}")
    args = _container(objs)["args"]
    assert [a for a in args if a.startswith("--namespace=")] == \
        ["--namespace=team-a", "--namespace=team-b"]
    # the operator parses what the chart passes
    from pd_operator.cli.main import build_parser
    assert build_parser().parse_args(args).namespace == ["team-a", "team-b"]
    for hooks in _hooks(objs).values():
        assert hooks[0]["namespaceSelector"] == {"matchExpressions": [{
            "key": "kubernetes.io/metadata.name", "operator": "In",
            "values": ["team-a", "team-b"]}]}
    # an explicit webhook.namespaceSelector wins
    objs = objects("operator.watchNamespaces={team-a}",
                   "webhook.namespaceSelector.matchLabels.pdo=on")
    for hooks in _hooks(objs).values():
        assert hooks[0]["namespaceSelector"] == {"matchLabels": {"pdo": "on"}}
    out = template("operator.watchNamespaces={Bad_Name}", check=False)
    assert out.returncode != 0 and "watchNamespaces" in out.stderr


# ------------------------------------------------------------------ the real node's values
def test_realnode_values_place_the_operator_on_the_real_node():
    from pd_dev.devcluster import realnode

    objs = objects(values=(REALNODE,), tests=True)
    taint = {**realnode.REAL_NODE_TAINT, "operator": "Equal"}
    pods = [one(objs, "Deployment")["spec"]["template"]["spec"],
            one(objs, "Pod")["spec"]]  # the operator and the helm test Pod
    for pod in pods:
        # merged with the chart's default kubernetes.io/os: linux, which the kubelet sets too
        assert pod["nodeSelector"] == {realnode.REAL_NODE_LABEL: "true",
                                       "kubernetes.io/os": "linux"}
        assert pod["tolerations"] == [taint]
    assert one(objs, "Deployment")["spec"]["replicas"] == 1
    image = _container(objs)
    assert not image["image"].endswith(":latest") and image["imagePullPolicy"] == "IfNotPresent"


# ------------------------------------------------------------------- the helm test hook
ADMISSION_SCRIPT = CHART / "files" / "admission-test.py"


def _test_hooks(*sets: str) -> list[dict[str, Any]]:
    return [o for o in objects(*sets, tests=True)
            if o["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"]


def test_helm_test_hook_objects():
    hooks = _test_hooks("operator.tolerations[0].key=dedicated",
                        "operator.tolerations[0].operator=Exists")
    assert sorted(o["kind"] for o in hooks) == \
        ["ConfigMap", "Pod", "Role", "RoleBinding", "ServiceAccount"]
    assert not [o for o in objects() if o["kind"] == "Pod"]  # not installed, only at helm test
    weight = {o["kind"]: int(o["metadata"]["annotations"]["helm.sh/hook-weight"])
              for o in hooks}
    assert max(w for k, w in weight.items() if k != "Pod") < weight["Pod"]
    for o in hooks:
        policy = set(o["metadata"]["annotations"]["helm.sh/hook-delete-policy"].split(","))
        # the Pod outlives a pass: `helm test --logs` reads it after hook-succeeded deletions
        assert policy == ({"before-hook-creation"} if o["kind"] == "Pod" else
                          {"before-hook-creation", "hook-succeeded"}), o["kind"]
        assert o["metadata"]["namespace"] == NS
    sa, role, binding, pod = (one(hooks, k) for k in
                              ("ServiceAccount", "Role", "RoleBinding", "Pod"))
    # may create PDDeployments in the release namespace, nothing else
    assert role["rules"] == [{"apiGroups": ["serving.pd-operator.dev"],
                              "resources": ["pddeployments"], "verbs": ["create"]}]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": NS}]
    spec = pod["spec"]
    assert spec["serviceAccountName"] == sa["metadata"]["name"]
    assert spec["restartPolicy"] == "Never" and spec["activeDeadlineSeconds"] > 0
    operator = one(objects("operator.tolerations[0].key=dedicated",
                           "operator.tolerations[0].operator=Exists"), "Deployment")
    op_spec = operator["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    op_c = op_spec["containers"][0]
    assert c["image"] == op_c["image"] and c["imagePullPolicy"] == op_c["imagePullPolicy"]
    assert spec["nodeSelector"] == op_spec["nodeSelector"]
    assert spec["tolerations"] == op_spec["tolerations"] == [
        {"key": "dedicated", "operator": "Exists"}]
    assert spec["securityContext"] == op_spec["securityContext"]
    assert c["securityContext"] == op_c["securityContext"]  # read-only root: /tmp emptyDir
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/etc/pd-operator-test", "/tmp"}
    # the webhook it expects the denial from is this release's validating webhook
    env = {e["name"]: e.get("value") for e in c["env"]}
    validating = _hooks(objects())["ValidatingWebhookConfiguration"][0]["name"]
    assert env["WEBHOOK_NAME"] == validating
    assert env["NAMESPACE"] == NS
    data = one(hooks, "ConfigMap")["data"]
    assert data["admission-test.py"] == ADMISSION_SCRIPT.read_text()
    assert c["command"] == ["python3", "/etc/pd-operator-test/admission-test.py"]
    assert env["MANIFEST"] == "/etc/pd-operator-test/pddeployment.yaml"


@pytest.mark.parametrize("watched, where", [
    ("{team-a,team-b}", "team-a"),          # the release namespace is not reviewed
    (f"{{team-a,{NS}}}", NS),
])
def test_helm_test_submits_where_the_webhooks_review(watched, where):
    hooks = _test_hooks(f"operator.watchNamespaces={watched}")
    sa, role, binding, pod = (one(hooks, k) for k in
                              ("ServiceAccount", "Role", "RoleBinding", "Pod"))
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["NAMESPACE"] == where
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == where
    assert sa["metadata"]["namespace"] == pod["metadata"]["namespace"] == NS
    assert binding["subjects"][0]["namespace"] == NS


def test_helm_test_object_is_the_rejected_example_and_fails_with_its_rule():
    data = one(_test_hooks(), "ConfigMap")["data"]
    obj = yaml.safe_load(data["pddeployment.yaml"])
    example = yaml.safe_load((EXAMPLES / "rejected" / "tp-not-divisible.yaml").read_text())
    assert obj == example
    rule = obj["metadata"]["annotations"]["pd-operator.dev/expect-rule"]
    from pd_operator.webhook import review
    out = review.validate({"operation": "CREATE", "object": {
        **obj, "metadata": {**obj["metadata"], "namespace": NS}}})
    assert not out.allowed and f"[{rule}]" in out.message
    # the name passes the CRD's NAME-RENDERABLE rule: the webhook, not the schema, refuses it
    from pd_operator.api import v1alpha1
    assert v1alpha1.name_error(obj["metadata"]["name"]) is None


def _admission_script():
    """files/admission-test.py as a module (a fresh one each time: tests patch it)."""
    import importlib.util
    import sys

    name = "chart_admission_test"
    spec = importlib.util.spec_from_file_location(name, ADMISSION_SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


HOOK = "validate.rel-pd-operator.serving.pd-operator.dev"


def _status(code: int, message: str) -> str:
    return json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                       "message": message, "code": code})


def _denial(hook: str, rule: str) -> str:
    return _status(403, f'admission webhook "{hook}" denied the request: PDDeployment '
                   f"'tp-not-divisible' is rejected by 1 compatibility rule ({rule}):\n"
                   f"  1. [{rule}] prefill TP 2 and decode TP 5 do not divide each other")


@pytest.mark.parametrize("status, body, outcome", [
    (None, "", "fail"),                                            # admitted
    (403, _denial(HOOK, "TP-DIVISIBLE"), "pass"),
    (403, _denial(HOOK, "KV-DTYPE-MISMATCH"), "fail"),             # another rule
    (403, _denial("validate.other.serving.pd-operator.dev", "TP-DIVISIBLE"), "retry"),
    (500, _status(500, 'Internal error occurred: failed calling webhook "' + HOOK + '": '
                  "dial tcp 10.96.0.9:443: connect: connection refused"), "retry"),
    (403, _status(403, 'pddeployments.serving.pd-operator.dev is forbidden: User "system:'
                  'serviceaccount:ns:t" cannot create resource "pddeployments"'), "retry"),
    (404, _status(404, "the server could not find the requested resource"), "retry"),
    (422, _status(422, 'PDDeployment.serving.pd-operator.dev "x" is invalid'), "fail"),
    (400, "not json", "fail"),
])
def test_helm_test_judges_each_answer(status, body, outcome):
    verdict = _admission_script().judge(status, body, "TP-DIVISIBLE", HOOK)
    assert verdict.outcome == outcome, verdict


class _FakeAPIServer:
    """Answers POSTs with canned (status, body) pairs, in order, and records the requests."""

    def __init__(self, answers: list[tuple[int, str]]):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.answers, self.requests = list(answers), []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                length = int(self.headers.get("Content-Length", 0))
                fake.requests.append((self.path, json.loads(self.rfile.read(length))))
                code, body = fake.answers.pop(0) if fake.answers else (500, _status(500, "?"))
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _run_script(monkeypatch, tmp_path, answers, deadline_s="5"):
    """The script's main() with the real Kubernetes client, against the fake API server."""
    kubernetes = pytest.importorskip("kubernetes")
    module = _admission_script()
    fake = _FakeAPIServer(answers)
    manifest = tmp_path / "pdd.yaml"
    manifest.write_text(chart_values.render_admission_test_object())

    def incluster():
        cfg = kubernetes.client.Configuration()
        cfg.host = fake.url
        kubernetes.client.Configuration.set_default(cfg)

    monkeypatch.setattr(kubernetes.config, "load_incluster_config", incluster)
    monkeypatch.setattr(module, "RETRY_EVERY_S", 0.01)
    for k, v in {"MANIFEST": str(manifest), "NAMESPACE": "ns", "WEBHOOK_NAME": HOOK,
                 "DEADLINE_S": deadline_s}.items():
        monkeypatch.setenv(k, v)
    try:
        return module.main(), fake.requests
    finally:
        fake.close()
        kubernetes.client.Configuration.set_default(None)


def test_helm_test_script_retries_until_this_webhook_denies(monkeypatch, tmp_path, capsys):
    unreachable = _status(500, f'failed calling webhook "{HOOK}": connection refused')
    code, requests = _run_script(monkeypatch, tmp_path, [
        (500, unreachable), (403, _denial(HOOK, "TP-DIVISIBLE"))])
    assert code == 0, capsys.readouterr().out
    assert len(requests) == 2
    path, body = requests[0]
    assert path.startswith("/apis/serving.pd-operator.dev/v1alpha1/namespaces/ns/pddeployments")
    assert "dryRun=All" in path  # server-side dry run: nothing is stored
    assert body["metadata"] == {**body["metadata"], "name": "tp-not-divisible",
                                "namespace": "ns"}
    assert "PASS: denied by " + HOOK in capsys.readouterr().out


def test_helm_test_script_fails_when_admitted_or_never_denied(monkeypatch, tmp_path, capsys):
    admitted = json.dumps({"apiVersion": "serving.pd-operator.dev/v1alpha1",
                           "kind": "PDDeployment", "metadata": {"name": "tp-not-divisible"}})
    code, requests = _run_script(monkeypatch, tmp_path, [(201, admitted)])
    assert code == 1 and len(requests) == 1
    assert "admitted" in capsys.readouterr().out
    code, _ = _run_script(monkeypatch, tmp_path, [], deadline_s="0.2")  # 500s until the end
    assert code == 1 and "deadline" in capsys.readouterr().out
