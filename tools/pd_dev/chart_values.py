"""The Helm chart's values, as data, and the renderers of the chart's derived files.

`make generate` (pd_dev.generate) writes them; `make check-generated` fails when one differs.
One table (`VALUES`: key, type, default, description) is the source of
`charts/pd-operator/values.yaml` (every key with its comment), `values.schema.json`
(`additionalProperties: false`, so a misspelt key fails `helm install`) and the values table in
`charts/pd-operator/README.md` (between the GENERATED markers); Chart.yaml's appVersion is the
project's version. The chart's CRD template
`templates/crd-serving.pd-operator.dev_pddeployments.yaml` is `crds/pddeployment.yaml` (itself
generated) wrapped in a `crds.enabled` guard with an optional keep policy; the object the chart's
`helm test` submits (`files/admission-test-pddeployment.yaml`) is the rejected example
`deploy/examples/rejected/tp-not-divisible.yaml`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pd_operator import __version__

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "pd-operator"
CRD_SOURCE = ROOT / "crds" / "pddeployment.yaml"
CRD_TEMPLATE = "templates/crd-serving.pd-operator.dev_pddeployments.yaml"
README_BEGIN = "<!-- BEGIN GENERATED VALUES (make generate: tools/pd_dev/chart_values.py) -->"
README_END = "<!-- END GENERATED VALUES -->"
K8S_DOCS = "https://kubernetes.io/docs"


@dataclass(frozen=True)
class Value:
    key: str            # dotted path in values.yaml
    type: str           # JSON schema type: string | integer | number | boolean | object | array
    default: Any
    description: str    # what it does, why this default, when to change it
    schema: dict[str, Any] = field(default_factory=dict)  # extra keywords (enum, minimum, ...)
    # Kubernetes objects passed through verbatim (resources, nodeSelector...): any keys allowed.
    free_form: bool = False


RESTRICTED_POD = {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
                  "fsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}}
RESTRICTED_CONTAINER = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True}

VALUES: list[Value] = [
    # ------------------------------------------------------------------------ names
    Value("nameOverride", "string", "",
          "Replaces the chart name in object names. Change it only to run two differently "
          "named copies side by side; names are cut to 63 characters (the DNS label limit)."),
    Value("fullnameOverride", "string", "",
          "Replaces `<release>-<chart>` in object names (63 characters at most). Empty: "
          "the release name, suffixed with the chart name unless it already contains it."),
    # ------------------------------------------------------------------------- CRDs
    Value("crds.enabled", "boolean", True,
          "Install the PDDeployment CustomResourceDefinition with the chart. Set to false when "
          "the CRD is managed elsewhere (GitOps, `kubectl apply -f crds/`) or when a second "
          "release shares the cluster's CRD."),
    Value("crds.keep", "boolean", True,
          "Annotate the CRD with `helm.sh/resource-policy: keep`, so `helm uninstall` leaves it "
          "(deleting a CRD deletes every PDDeployment in the cluster, and with them the "
          "pools). Set to false only on throw-away clusters."),
    # ------------------------------------------------------------------------ image
    Value("image.repository", "string", "ghcr.io/pd-operator/pd-operator",
          "Operator image (built from deploy/images/operator.Dockerfile). Change it for a "
          "mirror or a private registry."),
    Value("image.tag", "string", "",
          "Image tag. Empty: the chart's appVersion, so chart and operator versions move "
          "together. Set it to test a build without changing the chart."),
    Value("image.digest", "string", "",
          "Image digest (`sha256:...`); when set it wins over the tag, which pins exactly what "
          "runs. For example: `sha256:3f5e...`.", {"pattern": "^(sha256:[a-f0-9]{64})?$"}),
    Value("image.pullPolicy", "string", "IfNotPresent",
          f"Image pull policy ({K8S_DOCS}/concepts/containers/images/#image-pull-policy). "
          "`Always` only when testing a moving tag.",
          {"enum": ["Always", "IfNotPresent", "Never"]}),
    Value("imagePullSecrets", "array", [],
          "Secrets for pulling the image from a private registry. For example: "
          "`[{name: regcred}]`.", {"items": {"type": "object"}}),
    # --------------------------------------------------------------------- operator
    Value("operator.replicas", "integer", 2,
          "Operator pods. Every pod serves the admission webhook; only the holder of the "
          "leader Lease reconciles. Two keep the webhook (failurePolicy Fail) answering during "
          "a node drain or a rollout; one is enough for development.", {"minimum": 0}),
    Value("operator.applyConcurrency", "integer", 8,
          "Concurrent server-side applies per PDDeployment (`--apply-concurrency`). Raise it "
          "only for clusters with hundreds of PDDeployments and an API server with headroom.",
          {"minimum": 1}),
    Value("operator.kvPathVerification", "boolean", True,
          "Prove the KV path of builtin pools before Ready: a real pull between a ready prefill "
          "and decode pod (condition KVPathVerified). `false` passes "
          "`--kv-path-verification=off`: for fake nodes (kwok) and development only, where pods "
          "run nothing; Ready then comes with KVPathVerified=Unknown (VerificationDisabled)."),
    Value("operator.verbose", "boolean", False,
          "Debug logging (`-v`): kopf logs every handler run. For troubleshooting only."),
    Value("operator.extraArgs", "array", [],
          "Extra arguments to `pdctl operator run`. For example: `[--lease-duration, \"30\"]`.",
          {"items": {"type": "string"}}),
    Value("operator.watchNamespaces", "array", [],
          "Namespaces whose PDDeployments this release reconciles (`--namespace` for each) "
          "and, unless webhook.namespaceSelector is set, reviews (a namespaceSelector on "
          "`kubernetes.io/metadata.name`). Empty: every namespace. Two releases on one "
          "cluster, or a release beside a development `pdctl operator run`, must not overlap: "
          "two operators would apply the same children and both webhooks (failurePolicy Fail) "
          "would have to answer for every object. For example: `[team-a, team-b]`.",
          {"items": {"type": "string", "maxLength": 63,
                     "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}, "uniqueItems": True}),
    Value("operator.resources", "object",
          {"requests": {"cpu": "100m", "memory": "192Mi"}, "limits": {"memory": "512Mi"}},
          f"Container resources ({K8S_DOCS}/concepts/configuration/manage-resources-containers/"
          "). The operator keeps one rendered copy of each PDDeployment's children in memory: "
          "raise the memory limit beyond a few hundred PDDeployments. No CPU limit, so the "
          "webhook is never throttled while the API server waits on it.", free_form=True),
    Value("operator.podSecurityContext", "object", RESTRICTED_POD,
          "Pod security context: non-root with the image's user (65532) and the RuntimeDefault "
          "seccomp profile, which meets the `restricted` Pod Security Standard "
          f"({K8S_DOCS}/concepts/security/pod-security-standards/).", free_form=True),
    Value("operator.securityContext", "object", RESTRICTED_CONTAINER,
          "Container security context: no privilege escalation, read-only root filesystem "
          "(/tmp is an emptyDir), every capability dropped.", free_form=True),
    Value("operator.podAnnotations", "object", {},
          "Annotations added to the operator pods. For example: "
          "`{prometheus.io/scrape: \"true\"}`.", free_form=True),
    Value("operator.podLabels", "object", {},
          "Labels added to the operator pods (not to the selector).", free_form=True),
    Value("operator.nodeSelector", "object", {"kubernetes.io/os": "linux"},
          f"Node selector ({K8S_DOCS}/concepts/scheduling-eviction/assign-pod-node/). The "
          "operator needs no GPU: keep it off GPU nodes with a selector or affinity.",
          free_form=True),
    Value("operator.tolerations", "array", [],
          "Tolerations for the operator pods. For example: "
          "`[{key: dedicated, operator: Equal, value: system, effect: NoSchedule}]`.",
          {"items": {"type": "object"}}),
    Value("operator.affinity", "object", {},
          "Affinity for the operator pods. Empty: a preferred anti-affinity that spreads the "
          "replicas over nodes is used.", free_form=True),
    Value("operator.priorityClassName", "string", "",
          "Priority class. The webhook fails closed, so on busy clusters "
          "`system-cluster-critical` keeps PDDeployment admission available."),
    # ------------------------------------------------------------- leader election
    Value("leaderElection.enabled", "boolean", True,
          "Elect one reconciling replica with a Lease in the release namespace "
          "(`--no-leader-election` when false). Turn it off only with operator.replicas 1."),
    Value("leaderElection.leaseDuration", "number", 15,
          "Seconds a leader may go without renewing before another replica takes over "
          "(`--lease-duration`). Lower means faster failover and more API writes.",
          {"minimum": 2}),
    # ------------------------------------------------------------------- identities
    Value("serviceAccount.create", "boolean", True,
          "Create the operator's ServiceAccount. Set to false to use one made elsewhere "
          "(then set serviceAccount.name)."),
    Value("serviceAccount.name", "string", "",
          "ServiceAccount name. Empty: the chart's full name."),
    Value("serviceAccount.annotations", "object", {},
          "Annotations on the ServiceAccount (for example a cloud IAM role binding).",
          free_form=True),
    Value("rbac.create", "boolean", True,
          "Create the ClusterRole, ClusterRoleBinding and the leader-election Role. Set to "
          "false only when a cluster admin grants the same rules (see templates/"
          "operator-rbac.yaml for the list and the reason for each)."),
    # ---------------------------------------------------------------------- webhook
    Value("webhook.port", "integer", 9443,
          "Container port of the HTTPS admission webhook (`--webhook-port`); the webhook "
          "Service listens on 443.", {"minimum": 1, "maximum": 65535}),
    Value("webhook.timeoutSeconds", "integer", 5,
          "How long the API server waits for a review (1-5). A review is about a millisecond "
          "of CPU, so the timeout matters only when the operator is unreachable; kubectl "
          "users then wait this long before failurePolicy decides. The schema caps it at 5 "
          "so a stuck operator never stalls `kubectl apply` for the API maximum of 30 s.",
          {"minimum": 1, "maximum": 5}),
    Value("webhook.failurePolicy", "string", "Fail",
          "What the API server does when the webhook cannot be reached. `Fail` (default): no "
          "PDDeployment is admitted unchecked. `Ignore` admits unchecked objects (the "
          "operator then refuses to launch incompatible pools and reports it in status).",
          {"enum": ["Fail", "Ignore"]}),
    Value("webhook.namespaceSelector", "object", {},
          "Limits the namespaces whose PDDeployments are reviewed. Empty: all namespaces. "
          "For example: `{matchLabels: {pd-operator.dev/enabled: \"true\"}}`.", free_form=True),
    Value("webhook.url", "string", "",
          "Development only: the API server calls this HTTPS base URL (the paths /validate "
          "and /mutate are appended) instead of the webhook Service, e.g. "
          "`https://127.0.0.1:9443` for `pdctl operator run` on the control-plane host. The "
          "URL's host is added to the serving certificate.",
          {"pattern": "^(https://[^/]+)?$"}),
    Value("webhook.certificate.validityDays", "integer", 3650,
          "Validity of the self-signed CA and serving certificate (used when certManager is "
          "off). They are made once and reused on every upgrade (the Secret is looked up), so "
          "the CA bundle stays stable; delete the Secret and upgrade to rotate them.",
          {"minimum": 1}),
    Value("webhook.networkPolicy.enabled", "boolean", True,
          "A NetworkPolicy on the operator pods that admits ingress only to the webhook port "
          "(and the metrics port when metrics.enabled); egress is not restricted. Enforced "
          "only where the cluster's CNI implements NetworkPolicy (Calico, Cilium, ...); "
          "elsewhere it is inert. Set to false when another policy manages the namespace."),
    Value("webhook.networkPolicy.from", "array", [],
          "Who may reach the webhook port (NetworkPolicyPeer list). Empty: any source, "
          "because where the API server's requests come from differs per cluster (control-"
          "plane node addresses, or a managed control plane outside the pod network). "
          "Narrow it to your control plane, for example: "
          "`[{ipBlock: {cidr: 10.0.0.0/24}}]`.", {"items": {"type": "object"}}),
    # ------------------------------------------------------------------- validation
    Value("validation.forbiddenPolicies", "array", [],
          "PDDeployment `spec.validation.policy` values the webhook rejects, cluster-wide "
          "(`--forbid-validation-policies`): `Disabled` (the pools are not checked at all) "
          "and/or `Warn` (incompatible pools are admitted with warnings). A rejected object "
          "names the rule POLICY-FORBIDDEN, the field and the allowed values; objects already "
          "stored keep working and may still be relabelled, but their next spec change must "
          "pick an allowed policy. It applies to every namespace the webhook reviews; a "
          "namespace can forbid more for itself with the label "
          "`pd-operator.dev/forbid-validation-policies: Disabled.Warn` (names separated by "
          "dots). For example: `[Disabled, Warn]`.",
          {"items": {"type": "string", "enum": ["Warn", "Disabled"]}, "uniqueItems": True}),
    Value("certManager.enabled", "boolean", False,
          "Use cert-manager (must be installed) instead of the chart's self-signed "
          "certificate: a self-signed Issuer, a CA Certificate, a CA Issuer and the serving "
          "Certificate; cert-manager's cainjector fills the webhooks' caBundle "
          "(`cert-manager.io/inject-ca-from`) and renews the certificate."),
    Value("certManager.duration", "string", "8760h",
          "Serving certificate lifetime when certManager.enabled (Go duration).",
          {"pattern": "^([0-9]+h)?([0-9]+m)?([0-9]+s)?$"}),
    Value("certManager.renewBefore", "string", "720h",
          "Renew the serving certificate this long before it expires (certManager.enabled). "
          "The operator reads the mounted file at start: a renewal rolls out via kubelet's "
          "Secret refresh plus a pod restart.", {"pattern": "^([0-9]+h)?([0-9]+m)?([0-9]+s)?$"}),
    # ----------------------------------------------------------------------- metrics
    Value("metrics.enabled", "boolean", True,
          "Serve Prometheus metrics (`--metrics-port`) and create the metrics Service."),
    Value("metrics.port", "integer", 8080,
          "Metrics port (HTTP, path /metrics) on the pod and the metrics Service. Change it "
          "only when 8080 clashes with a sidecar.", {"minimum": 1, "maximum": 65535}),
    Value("metrics.bindAddress", "string", "",
          "Address the metrics server listens on (`--metrics-addr`). Empty: the pod's own IP "
          "(downward API), which the metrics Service reaches, rather than every interface. "
          "For example `127.0.0.1` for a scraping sidecar only.",
          {"pattern": "^[0-9a-fA-F:.]*$"}),
    Value("metrics.networkPolicy.from", "array", [],
          "Who may reach the metrics port when webhook.networkPolicy.enabled (NetworkPolicy"
          "Peer list). Empty: any source. For example: "
          "`[{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: monitoring}}}]`.",
          {"items": {"type": "object"}}),
    Value("metrics.serviceAnnotations", "object", {},
          "Annotations on the metrics Service. For example: "
          "`{prometheus.io/scrape: \"true\", prometheus.io/port: \"8080\"}`.", free_form=True),
    # ----------------------------------------------------------------------------- PDB
    Value("podDisruptionBudget.enabled", "boolean", True,
          "Create a PodDisruptionBudget for the operator pods (only rendered with 2 or more "
          "replicas: with one, it would block every node drain)."),
    Value("podDisruptionBudget.minAvailable", "integer", 1,
          "Operator pods that a voluntary disruption must leave running: 1 keeps the webhook "
          "answering.", {"minimum": 0}),
]


# ---------------------------------------------------------------------------- builders
def _tree() -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for v in VALUES:
        *parents, leaf = v.key.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def defaults() -> dict[str, Any]:
    def strip(node: dict[str, Any]) -> dict[str, Any]:
        return {k: (strip(c) if isinstance(c, dict) else c.default) for k, c in node.items()}
    return strip(_tree())


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return lines + ([line] if line else [])


def _scalar(value: Any) -> str:
    """JSON (a subset of YAML): one line, unambiguous for strings like "" or "1"."""
    return json.dumps(value, separators=(", ", ": "))


def render_values_yaml() -> str:
    out = ["# Values of the pd-operator chart. Generated by `make generate`",
           "# from tools/pd_dev/chart_values.py: edit that table, not this file.",
           "# values.schema.json (additionalProperties: false) rejects unknown keys."]

    def emit(node: dict[str, Any], indent: int) -> None:
        pad = "  " * indent
        for i, (key, child) in enumerate(node.items()):
            if i or not indent:
                out.append("")
            if isinstance(child, dict):
                out.append(f"{pad}{key}:")
                emit(child, indent + 1)
                continue
            out.extend(f"{pad}# {line}" for line in _wrap(child.description, 96 - len(pad)))
            out.append(f"{pad}# Default: {_scalar(child.default)}")
            d = child.default
            if isinstance(d, (dict, list)) and d:
                block = yaml.safe_dump(d, sort_keys=False, default_flow_style=False)
                out.append(f"{pad}{key}:")
                out.extend(f"{pad}  {line}" for line in block.rstrip().splitlines())
            else:
                out.append(f"{pad}{key}: {_scalar(d)}")
    emit(_tree(), 0)
    return "\n".join(out) + "\n"


def build_schema() -> dict[str, Any]:
    def node_schema(node: dict[str, Any]) -> dict[str, Any]:
        props: dict[str, Any] = {}
        for key, child in node.items():
            if isinstance(child, dict):
                props[key] = node_schema(child)
                continue
            s: dict[str, Any] = {"type": child.type, "description": child.description,
                                 "default": child.default, **child.schema}
            props[key] = s
        return {"type": "object", "additionalProperties": False, "properties": props}
    schema = {"$schema": "https://json-schema.org/draft-07/schema#",
              "title": "pd-operator chart values",
              **node_schema(_tree())}
    return schema


def render_schema() -> str:
    return json.dumps(build_schema(), indent=2) + "\n"


def render_values_table() -> str:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for v in VALUES:
        default = _scalar(v.default).replace("|", "\\|")
        desc = v.description.replace("|", "\\|")
        rows.append(f"| `{v.key}` | {v.type} | `{default}` | {desc} |")
    return "\n".join(rows) + "\n"


def render_readme(current: str) -> str:
    head, sep, rest = current.partition(README_BEGIN)
    _, sep2, tail = rest.partition(README_END)
    if not sep or not sep2:
        raise SystemExit(f"charts/pd-operator/README.md lacks the markers {README_BEGIN!r} "
                         f"... {README_END!r}")
    return f"{head}{README_BEGIN}\n{render_values_table()}{README_END}{tail}"


def render_crd_template(source: str | None = None) -> str:
    """crds/pddeployment.yaml wrapped for the chart: crds.enabled guard, optional keep policy,
    the chart's labels. Text in, text out, so the CRD body stays byte-identical."""
    text = CRD_SOURCE.read_text(encoding="utf-8") if source is None else source
    if "{{" in text or "}}" in text:
        raise SystemExit("crds/pddeployment.yaml contains '{{' or '}}': Helm would read them "
                         "as template actions; escape them in the generator first")
    lines = text.splitlines()
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    try:
        ann = lines.index("  annotations:")
        lab = lines.index("  labels:")
        spec = lines.index("spec:")
    except ValueError as exc:
        raise SystemExit(f"unexpected CRD layout in crds/pddeployment.yaml: {exc}") from None
    if not ann < lab < spec:
        raise SystemExit("unexpected CRD layout: metadata.annotations, then labels, then spec")
    lines.insert(lab + 1, '    {{- include "pd-operator.labels" (list . "crd") | nindent 4 }}')
    lines.insert(ann + 1, "    {{- if .Values.crds.keep }}\n"
                          "    helm.sh/resource-policy: keep\n"
                          "    {{- end }}")
    header = ["{{- /*",
              "Generated by `make generate` (pd_dev.chart_values) from crds/pddeployment.yaml",
              "(itself generated by `pdctl crd`). DO NOT EDIT.",
              "*/ -}}",
              "{{- if .Values.crds.enabled }}"]
    return "\n".join(header + lines + ["{{- end }}"]) + "\n"


REJECTED_EXAMPLE = ROOT / "deploy" / "examples" / "rejected" / "tp-not-divisible.yaml"
ADMISSION_TEST_OBJECT = "files/admission-test-pddeployment.yaml"


def render_admission_test_object(source: str | None = None) -> str:
    """The known-bad PDDeployment `helm test` submits (templates/tests/admission-test.yaml): the
    rejected example verbatim, so the chart's test and `pdctl check` judge the same object."""
    text = REJECTED_EXAMPLE.read_text(encoding="utf-8") if source is None else source
    return ("# Generated by `make generate` (pd_dev.chart_values) from\n"
            "# deploy/examples/rejected/tp-not-divisible.yaml. DO NOT EDIT.\n" + text)


GENERATED_HELPERS = "templates/_generated.tpl"


def render_generated_helpers() -> str:
    """Template snippets taken from the operator's own code, so the chart cannot drift from it."""
    import yaml

    from pd_operator.webhook import configs

    conditions = yaml.safe_dump(configs.MUTATE_MATCH_CONDITIONS, sort_keys=False, width=1000)
    return "\n".join([
        "{{/* Generated by `make generate` (pd_dev.chart_values) from",
        "   pd_operator.webhook.configs. DO NOT EDIT. */}}",
        "{{/* The mutating webhook is called only when a default it writes is missing. */}}",
        '{{- define "pd-operator.webhook.mutateMatchConditions" -}}',
        conditions.rstrip("\n"),
        "{{- end }}",
    ]) + "\n"


def render_chart_yaml(current: str) -> str:
    """Chart.yaml with `appVersion` set to the project's one version (pd_runtime.__version__);
    the rest of the file, the chart's own SemVer included, is hand-written."""
    lines = current.splitlines(keepends=True)
    app = [i for i, line in enumerate(lines) if line.startswith("appVersion:")]
    if len(app) != 1:
        raise SystemExit("charts/pd-operator/Chart.yaml needs exactly one appVersion line")
    lines[app[0]] = f'appVersion: "{__version__}"\n'
    return "".join(lines)


def outputs(crd_text: str | None = None) -> dict[Path, str]:
    """The chart's generated files; `crd_text` is the CRD the template wraps (default: the
    committed crds/pddeployment.yaml)."""
    readme, chart_yaml = CHART / "README.md", CHART / "Chart.yaml"
    return {
        chart_yaml: render_chart_yaml(chart_yaml.read_text(encoding="utf-8")),
        CHART / "values.yaml": render_values_yaml(),
        CHART / "values.schema.json": render_schema(),
        readme: render_readme(readme.read_text(encoding="utf-8")),
        CHART / CRD_TEMPLATE: render_crd_template(crd_text),
        CHART / GENERATED_HELPERS: render_generated_helpers(),
        CHART / ADMISSION_TEST_OBJECT: render_admission_test_object(),
    }
