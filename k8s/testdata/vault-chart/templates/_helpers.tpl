{{- define "vault.mode" -}}
{{- if and .Values.server.ha.enabled .Values.server.ha.raft.enabled -}}ha-raft
{{- else if .Values.server.ha.enabled -}}ha
{{- else -}}standalone
{{- end -}}
{{- end -}}

{{- define "vault.replicas" -}}
{{- if .Values.server.ha.enabled -}}{{ .Values.server.ha.replicas }}{{- else -}}1{{- end -}}
{{- end -}}

{{- define "vault.labels" -}}
app.kubernetes.io/name: vault
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "vault.config" -}}
{{- if eq (include "vault.mode" .) "standalone" -}}
{{ tpl .Values.server.standalone.config . }}
{{- else -}}
{{ tpl .Values.server.ha.raft.config . }}
{{- end -}}
{{- end -}}

{{- define "vault.podSecurityContext" -}}
{{- if .Values.server.statefulSet.securityContext.pod -}}
{{ toYaml .Values.server.statefulSet.securityContext.pod }}
{{- else -}}
runAsNonRoot: true
runAsGroup: {{ .Values.server.gid | default 1000 }}
runAsUser: {{ .Values.server.uid | default 100 }}
fsGroup: {{ .Values.server.gid | default 1000 }}
{{- end -}}
{{- end -}}
