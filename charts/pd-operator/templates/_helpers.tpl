{{/*
Names and labels. Every define is prefixed with "pd-operator." so that it cannot collide with a
parent chart's defines.
*/}}

{{/*
The chart name. Cut to 63 characters: object names used as DNS labels (Services) and label
values may not be longer.
*/}}
{{- define "pd-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name, prefix of every object name: "<release>-<chart>", or the release name alone when
it already contains the chart name. Cut to 63 characters (the DNS label limit); derived names
("-webhook", "-metrics") cut again after the suffix is added.
*/}}
{{- define "pd-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* "<fullname>-<suffix>", cut to 63 characters. Usage: include "pd-operator.suffixed" (list . "webhook") */}}
{{- define "pd-operator.suffixed" -}}
{{- $root := index . 0 }}
{{- printf "%s-%s" (include "pd-operator.fullname" $root | trunc (int (sub 62 (len (index . 1))))) (index . 1) | trimSuffix "-" }}
{{- end }}

{{/* Labels of one component. Usage: include "pd-operator.labels" (list . "operator") */}}
{{- define "pd-operator.labels" -}}
{{- $root := index . 0 -}}
helm.sh/chart: {{ printf "%s-%s" $root.Chart.Name $root.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "pd-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
app.kubernetes.io/part-of: pd-operator
{{- end }}

{{/* Selector labels of one component (never change them: Deployment selectors are immutable). */}}
{{- define "pd-operator.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "pd-operator.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "pd-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "pd-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "pd-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "pd-operator.leaseName" -}}
{{- include "pd-operator.suffixed" (list . "leader") }}
{{- end }}

{{/* ------------------------------------------------------------------ webhook */}}
{{- define "pd-operator.webhook.serviceName" -}}
{{- include "pd-operator.suffixed" (list . "webhook") }}
{{- end }}

{{- define "pd-operator.webhook.secretName" -}}
{{- include "pd-operator.suffixed" (list . "webhook-tls") }}
{{- end }}

{{/* Name of both webhook configurations (cluster-scoped: one per release). */}}
{{- define "pd-operator.webhook.configName" -}}
{{- include "pd-operator.fullname" . }}.serving.pd-operator.dev
{{- end }}

{{/* The host of webhook.url without the port ("" when unset). IPv6 literals are not supported. */}}
{{- define "pd-operator.webhook.urlHost" -}}
{{- if .Values.webhook.url }}
{{- (split ":" (urlParse .Values.webhook.url).host)._0 }}
{{- end }}
{{- end }}

{{/*
DNS names of the serving certificate, as a JSON list: the Service as seen from its own namespace,
from others, and fully (what the API server dials), plus the host of webhook.url unless it is an
IPv4 address (see pd-operator.webhook.ipAddresses).
*/}}
{{- define "pd-operator.webhook.dnsNames" -}}
{{- $svc := include "pd-operator.webhook.serviceName" . }}
{{- $names := list $svc (printf "%s.%s" $svc .Release.Namespace) (printf "%s.%s.svc" $svc .Release.Namespace) }}
{{- $host := include "pd-operator.webhook.urlHost" . }}
{{- if and $host (not (regexMatch "^[0-9.]+$" $host)) }}
{{- $names = append $names $host }}
{{- end }}
{{- toJson $names }}
{{- end }}

{{- define "pd-operator.webhook.ipAddresses" -}}
{{- $host := include "pd-operator.webhook.urlHost" . }}
{{- if regexMatch "^[0-9.]+$" $host }}{{ toJson (list $host) }}{{ else }}[]{{ end }}
{{- end }}

{{/*
The self-signed CA and serving certificate (certManager.enabled false), as a dict {ca, crt, key}
of PEM strings, made ONCE per render and cached on the root context, so that the Secret and
both webhook configurations agree. On upgrade the existing Secret is looked up and reused while
its SANs (recorded in an annotation) still match, so the CA bundle stays stable across upgrades;
`helm template` cannot look up, so it makes a new pair each time.
Usage: $tls := include "pd-operator.webhook.tls" . | fromJson
*/}}
{{- define "pd-operator.webhook.tls" -}}
{{- if not (hasKey . "pdOperatorWebhookTLS") }}
{{- $sans := printf "%s %s" (include "pd-operator.webhook.dnsNames" .) (include "pd-operator.webhook.ipAddresses" .) }}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "pd-operator.webhook.secretName" .) }}
{{- $data := dig "data" dict $existing }}
{{- $recorded := dig "metadata" "annotations" "pd-operator.dev/certificate-sans" "" $existing }}
{{- $tls := dict }}
{{- if and (hasKey $data "ca.crt") (hasKey $data "tls.crt") (hasKey $data "tls.key") (eq $recorded $sans) }}
{{- $tls = dict "ca" (index $data "ca.crt" | b64dec) "crt" (index $data "tls.crt" | b64dec) "key" (index $data "tls.key" | b64dec) }}
{{- else }}
{{- $days := int .Values.webhook.certificate.validityDays }}
{{- $ca := genCA (printf "%s-ca" (include "pd-operator.fullname" .)) $days }}
{{- $dns := include "pd-operator.webhook.dnsNames" . | fromJsonArray }}
{{- $ips := include "pd-operator.webhook.ipAddresses" . | fromJsonArray }}
{{- $cert := genSignedCert (index $dns 2) $ips $dns $days $ca }}
{{- $tls = dict "ca" $ca.Cert "crt" $cert.Cert "key" $cert.Key }}
{{- end }}
{{- $_ := set $tls "sans" $sans }}
{{- $_ := set . "pdOperatorWebhookTLS" $tls }}
{{- end }}
{{- toJson (get . "pdOperatorWebhookTLS") }}
{{- end }}

{{/*
clientConfig of one webhook. Usage: include "pd-operator.webhook.clientConfig" (list . "/validate")
webhook.url (development) or the webhook Service; the caBundle comes from the chart's own CA, or
is left to cert-manager's cainjector (certManager.enabled).
*/}}
{{- define "pd-operator.webhook.clientConfig" -}}
{{- $root := index . 0 }}
{{- $path := index . 1 }}
{{- if $root.Values.webhook.url -}}
url: {{ printf "%s%s" (trimSuffix "/" $root.Values.webhook.url) $path | quote }}
{{- else -}}
service:
  name: {{ include "pd-operator.webhook.serviceName" $root }}
  namespace: {{ $root.Release.Namespace }}
  path: {{ $path }}
  port: 443
{{- end }}
{{- if not $root.Values.certManager.enabled }}
caBundle: {{ (include "pd-operator.webhook.tls" $root | fromJson).ca | b64enc }}
{{- end }}
{{- end }}

{{/* Annotations of both webhook configurations. */}}
{{- define "pd-operator.webhook.annotations" -}}
{{- if .Values.certManager.enabled -}}
cert-manager.io/inject-ca-from: {{ printf "%s/%s" .Release.Namespace (include "pd-operator.suffixed" (list . "webhook")) }}
{{- end }}
{{- end }}

{{/*
The parts both webhook configurations share. failurePolicy Fail by default: an unreachable
operator must not let an unchecked pair through. sideEffects None: a review writes nothing, so
dry-run requests are reviewed too. matchPolicy Equivalent: a request through another version of
the API (when one is added) is converted and still reviewed.
*/}}
{{- define "pd-operator.webhook.common" -}}
rules:
  - apiGroups: ["serving.pd-operator.dev"]
    apiVersions: ["v1alpha1"]
    operations: ["CREATE", "UPDATE"]
    resources: ["pddeployments"]
    scope: Namespaced
admissionReviewVersions: ["v1"]
sideEffects: None
failurePolicy: {{ .Values.webhook.failurePolicy }}
matchPolicy: Equivalent
timeoutSeconds: {{ .Values.webhook.timeoutSeconds }}
{{- with .Values.webhook.namespaceSelector }}
namespaceSelector:
  {{- toYaml . | nindent 2 }}
{{- else }}
{{- with .Values.operator.watchNamespaces }}
# operator.watchNamespaces: review only what this release reconciles
namespaceSelector:
  matchExpressions:
    - key: kubernetes.io/metadata.name
      operator: In
      values: {{ toJson . }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Fails when a webhook configuration of this name exists and is not this release's: helm would
refuse to adopt it anyway, with a less helpful message. A development `pdctl operator run
--local-webhook` registers "pd-operator.serving.pd-operator.dev", which is also the name of a
release whose full name is "pd-operator". Usage: include "pd-operator.webhook.guardName"
(list . "ValidatingWebhookConfiguration")
*/}}
{{- define "pd-operator.webhook.guardName" -}}
{{- $root := index . 0 }}
{{- $kind := index . 1 }}
{{- $name := include "pd-operator.webhook.configName" $root }}
{{- $existing := lookup "admissionregistration.k8s.io/v1" $kind "" $name }}
{{- if $existing }}
{{- $release := dig "metadata" "annotations" "meta.helm.sh/release-name" "" $existing }}
{{- $releaseNs := dig "metadata" "annotations" "meta.helm.sh/release-namespace" "" $existing }}
{{- if or (ne $release $root.Release.Name) (ne $releaseNs $root.Release.Namespace) }}
{{- $owner := ternary (printf "it belongs to release %s in namespace %s" $release $releaseNs) (printf "Helm did not make it (label app.kubernetes.io/managed-by: %s; `pdctl operator run --local-webhook` registers this name)" (dig "metadata" "labels" "app.kubernetes.io/managed-by" "unknown" $existing)) (ne $release "") }}
{{- fail (printf "%s %q already exists and is not this release's: %s. Stop that operator or uninstall that release, or install under another release name (or fullnameOverride); give each one its own operator.watchNamespaces." $kind $name $owner) }}
{{- end }}
{{- end }}
{{- end }}
