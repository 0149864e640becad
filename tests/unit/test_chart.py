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

HELM = build.binary_path("helm")
pytestmark = pytest.mark.skipif(
    not HELM.exists(), reason=f"helm binary absent at {HELM} (build it: pdctl dev cluster up)")


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=60)
    if check and out.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{out.stderr}{out.stdout}")
    return out


def template(*sets: str, check: bool = True) -> subprocess.CompletedProcess:
    args = ["template", RELEASE, str(CHART), "--namespace", NS, "--kube-version", KUBE_VERSION]
    for s in sets:
        args += ["--set", s]
    return helm(*args, check=check)


def objects(*sets: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(template(*sets).stdout) if d]


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
    text = "".join(p.read_text() for p in (CHART / "templates").iterdir())
    unused = [v.key for v in chart_values.VALUES if f".Values.{v.key}" not in text]
    assert not unused, f"values no template reads: {unused}"


def test_helm_lint_passes_for_each_scenario():
    helm("lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION)
    helm("lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION,
         "--set", "certManager.enabled=true", "--set", "webhook.url=https://127.0.0.1:9443")


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
