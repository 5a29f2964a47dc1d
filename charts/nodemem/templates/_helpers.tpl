{{/* Chart name, overridable. */}}
{{- define "nodemem.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Prefix of every object name: <release>-<name>, or the release name alone when it
already contains the chart name. Kept to 40 characters so that suffixes such as
"-agent-own-report" stay inside the 63-character label limit.
*/}}
{{- define "nodemem.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "nodemem.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "nodemem.labels" -}}
helm.sh/chart: {{ include "nodemem.chart" . }}
app.kubernetes.io/name: {{ include "nodemem.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: nodemem
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component: call with (dict "ctx" $ "component" "agent"). */}}
{{- define "nodemem.selectorLabels" -}}
app.kubernetes.io/name: {{ include "nodemem.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Labels of one component's objects. */}}
{{- define "nodemem.componentLabels" -}}
{{ include "nodemem.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "nodemem.agentName" -}}
{{- printf "%s-agent" (include "nodemem.fullname" .) }}
{{- end }}

{{- define "nodemem.controllerName" -}}
{{- printf "%s-controller" (include "nodemem.fullname" .) }}
{{- end }}

{{/* The agent's ServiceAccount user name, as the API server authenticates it. */}}
{{- define "nodemem.agentUsername" -}}
{{- printf "system:serviceaccount:%s:%s" .Release.Namespace (include "nodemem.agentName" .) }}
{{- end }}

{{/* The image reference: digest wins over tag; the tag defaults to appVersion. */}}
{{- define "nodemem.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
Checks the schema also makes, repeated here because `--skip-schema-validation`
skips the schema but never the templates.
*/}}
{{- define "nodemem.validate" -}}
{{- if and (gt (int .Values.controller.replicas) 1) (not .Values.controller.peering.enabled) }}
{{- fail "controller.replicas > 1 needs controller.peering.enabled=true: without kopf peering every replica would handle every policy (see values.yaml)" }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.enabled) }}
{{- fail "metrics.serviceMonitor.enabled needs metrics.enabled=true (the ServiceMonitor selects the metrics Service)" }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled .Values.metrics.podMonitor.enabled }}
{{- fail "enable metrics.serviceMonitor or metrics.podMonitor, not both: every agent would be scraped twice" }}
{{- end }}
{{- end }}
