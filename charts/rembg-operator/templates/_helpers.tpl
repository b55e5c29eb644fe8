{{/* Chart name, overridable. */}}
{{- define "rembg-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: <release>-<chart>, or the release name alone when it already contains the chart name. */}}
{{- define "rembg-operator.fullname" -}}
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

{{- define "rembg-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every object of the release carries (uninstall checks select on instance). */}}
{{- define "rembg-operator.labels" -}}
helm.sh/chart: {{ include "rembg-operator.chart" . }}
{{ include "rembg-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: rembg-fleet
{{- end }}

{{/* Immutable selector of the operator pod. */}}
{{- define "rembg-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rembg-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "rembg-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "rembg-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "rembg-operator.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/*
The RBAC rules, generated from operator/rembg_operator/rbac.py into files/rbac/rules.yaml
(`make chart` writes it; tests/chart fails on drift). Two lists: clusterRules are
cluster-scoped by nature; namespacedRules go into a Role per watched namespace, or into the
ClusterRole when the operator watches all namespaces.
*/}}
{{- define "rembg-operator.rbacRules" -}}
{{- $rules := .Files.Get "files/rbac/rules.yaml" | fromYaml }}
{{- if or (not $rules) (hasKey $rules "Error") (not (hasKey $rules "clusterRules")) (not (hasKey $rules "namespacedRules")) }}
{{- fail "files/rbac/rules.yaml is missing or invalid: run `make chart`" }}
{{- end }}
{{- toYaml $rules }}
{{- end }}

{{/* The operator's command-line arguments (python -m rembg_operator; flags override its
REMBG_OPERATOR_* environment). kopf serves /healthz on the liveness port. */}}
{{- define "rembg-operator.args" -}}
- --liveness-port={{ .Values.operator.healthPort }}
- --metrics-port={{ .Values.operator.metricsPort }}
- --log-level={{ .Values.operator.logLevel | upper }}
- --log-format={{ .Values.operator.logFormat }}
{{- if .Values.watch.namespaces }}
{{- range .Values.watch.namespaces }}
- --namespace={{ . }}
{{- end }}
{{- else }}
- --all-namespaces
{{- end }}
{{- range .Values.operator.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}
