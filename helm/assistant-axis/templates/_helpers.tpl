{{/* Every object's name starts with this: the release's name, or fullnameOverride. */}}
{{- define "axis.fullname" -}}
{{- .Values.fullnameOverride | default .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "axis.name" -}}
{{- .Values.nameOverride | default "assistant-axis" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "axis.labels" -}}
app.kubernetes.io/name: {{ include "axis.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "axis.selector" -}}
app.kubernetes.io/name: {{ include "axis.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "axis.imageTag" -}}
{{- .Values.image.tag | default .Chart.AppVersion -}}
{{- end -}}

{{- define "axis.image" -}}
{{ .Values.image.repository }}:{{ include "axis.imageTag" . }}
{{- end -}}

{{/* A component's image: its own when set, else the chart's (inference on GPUs: the chart's tag + "-cuda", deploy/Dockerfile.cuda). */}}
{{- define "axis.componentImage" -}}
{{- $img := .values.image | default dict -}}
{{- if $img.repository -}}
{{ $img.repository }}:{{ $img.tag | default (include "axis.imageTag" .root) }}
{{- else if and .values.gpu .values.gpu.enabled -}}
{{ .root.Values.image.repository }}:{{ include "axis.imageTag" .root }}-cuda
{{- else -}}
{{ include "axis.image" .root }}
{{- end -}}
{{- end -}}

{{/* Pod-level settings every component shares. */}}
{{- define "axis.podCommon" -}}
{{- /* Only a pod that talks to the Kubernetes API (the coordinator's discovery) gets a token for it. */}}
automountServiceAccountToken: {{ .kubernetesApi | default false }}
{{- with include "axis.serviceAccountName" . }}
serviceAccountName: {{ . }}
{{- end }}
{{- with .values.priorityClassName | default .root.Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
securityContext:
  {{- toYaml .root.Values.podSecurityContext | nindent 2 }}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Ports, probes on the gRPC health service, and the hardened container settings. */}}
{{- define "axis.containerCommon" -}}
image: {{ include "axis.componentImage" . }}
imagePullPolicy: {{ .root.Values.image.pullPolicy }}
securityContext:
  {{- toYaml .root.Values.containerSecurityContext | nindent 2 }}
ports:
  - name: grpc
    containerPort: {{ .values.port }}
  - name: metrics
    containerPort: {{ .values.metricsPort }}
  {{- with .chatPort }}
  - name: chat
    containerPort: {{ . }}
  {{- end }}
env:
  - name: AXIS_HOST
    value: 0.0.0.0
  - name: AXIS_LOG_LEVEL
    value: {{ .root.Values.logLevel | quote }}
  {{- if .root.Values.tls.enabled }}
  # TLS from the mounted Secret (tls.crt, tls.key, ca.crt); the probes use the plaintext health port.
  - { name: AXIS_TLS_CERT, value: /secrets/tls/tls.crt }
  - { name: AXIS_TLS_KEY, value: /secrets/tls/tls.key }
  - { name: AXIS_TLS_CA, value: /secrets/tls/ca.crt }
  {{- if .root.Values.tls.mutual }}
  - { name: AXIS_TLS_CLIENT_CA, value: /secrets/tls/ca.crt }
  {{- end }}
  - { name: AXIS_HEALTH_PORT, value: {{ .root.Values.tls.healthPort | quote }} }
  {{- end }}
  {{- with include "axis.extraEnv" . | trim }}
  {{- . | nindent 2 }}
  {{- end }}
readinessProbe:
  grpc:
    port: {{ include "axis.probePort" . }}
  periodSeconds: 5
livenessProbe:
  grpc:
    port: {{ include "axis.probePort" . }}
  periodSeconds: 20
  failureThreshold: 6
resources:
  {{- toYaml (.resources | default .values.resources) | nindent 2 }}
{{- end -}}

{{/* The port the kubelet probes: the gRPC port, or with TLS the plaintext health port (kubelet probes cannot speak TLS). */}}
{{- define "axis.probePort" -}}
{{- if .root.Values.tls.enabled -}}{{ .root.Values.tls.healthPort }}{{- else -}}{{ .values.port }}{{- end -}}
{{- end -}}

{{/* The TLS Secret's mount and volume, in every pod when TLS is on. */}}
{{- define "axis.tlsMount" -}}
{{- if .Values.tls.enabled }}
- { name: tls, mountPath: /secrets/tls, readOnly: true }
{{- end }}
{{- end -}}

{{- define "axis.tlsVolume" -}}
{{- if .Values.tls.enabled }}
{{- if not .Values.tls.existingSecret }}
{{- fail "tls.existingSecret: name the Secret holding tls.crt, tls.key and ca.crt (e.g. made by cert-manager) when tls.enabled is true" }}
{{- end }}
- name: tls
  secret:
    secretName: {{ .Values.tls.existingSecret }}
{{- end }}
{{- end -}}

{{/* node with the chart's nodeFlags (see values.yaml), then the service's entry point. */}}
{{- define "axis.nodeCommand" -}}
{{- $cmd := list "node" -}}
{{- range .root.Values.nodeFlags }}{{ $cmd = append $cmd . }}{{ end -}}
{{- append $cmd .entry | toJson -}}
{{- end -}}

{{/* The Secret holding the coordinator's token: the user's, the chart's own (auth.generate), or none. */}}
{{- define "axis.authSecret" -}}
{{- $a := .Values.coordinator.auth -}}
{{- if $a.existingSecret -}}{{ $a.existingSecret }}{{- else if $a.generate -}}{{ include "axis.fullname" . }}-coordinator-token{{- end -}}
{{- end -}}

{{- /*
Caller tokens: each internal service (inference, judge, aggregation) takes calls only with its
own token, which only it and the coordinator hold (one Secret, a key per service; the
coordinator mounts all three, each service its own). Called with (dict "root" . "service" "judge").
*/}}
{{- define "axis.callerSecret" -}}
{{- $t := .Values.callerTokens -}}
{{- if $t.existingSecret -}}{{ $t.existingSecret }}{{- else if $t.generate -}}{{ include "axis.fullname" . }}-caller-tokens{{- end -}}
{{- end -}}

{{- define "axis.callerArg" -}}
{{- if include "axis.callerSecret" .root }}
- --caller-token-file=/secrets/caller/{{ .service }}
{{- end }}
{{- end -}}

{{- define "axis.callerMount" -}}
{{- if include "axis.callerSecret" .root }}
- { name: caller-token, mountPath: /secrets/caller, readOnly: true }
{{- end }}
{{- end -}}

{{- define "axis.callerVolume" -}}
{{- if include "axis.callerSecret" .root }}
- name: caller-token
  secret:
    secretName: {{ include "axis.callerSecret" .root }}
    {{- if .service }}
    # This service's own key only: it cannot call the others.
    items:
      - { key: {{ .service }}, path: {{ .service }} }
    {{- end }}
{{- end }}
{{- end -}}

{{/* The Secret holding the chat endpoint's bearer token: the one named, or the chart's. */}}
{{- define "axis.chatSecret" -}}
{{- .Values.inference.chat.auth.existingSecret | default (printf "%s-chat-token" (include "axis.fullname" .)) -}}
{{- end }}


{{/*
A pod template's metadata: the selector labels, then the component's podLabels over the
top-level ones (the selector's keys win), and podAnnotations likewise.
Called with (dict "root" . "values" $component "component" "name").
*/}}
{{- define "axis.podMetadata" -}}
{{- $selector := dict "app.kubernetes.io/name" (include "axis.name" .root) "app.kubernetes.io/instance" .root.Release.Name "app.kubernetes.io/component" .component -}}
{{- $labels := merge $selector (deepCopy (.values.podLabels | default dict)) (deepCopy (.root.Values.podLabels | default dict)) -}}
{{- $annotations := merge (deepCopy (.values.podAnnotations | default dict)) (deepCopy (.root.Values.podAnnotations | default dict)) -}}
labels:
  {{- toYaml $labels | nindent 2 }}
{{- with $annotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* extraEnv: the top level's, less those the component names again, then the component's. */}}
{{- define "axis.extraEnv" -}}
{{- $own := dict -}}
{{- range (.values.extraEnv | default list) }}{{ $_ := set $own .name true }}{{ end -}}
{{- range (.root.Values.extraEnv | default list) }}
{{- if not (hasKey $own .name) }}
- {{ toJson . }}
{{- end }}
{{- end }}
{{- range (.values.extraEnv | default list) }}
- {{ toJson . }}
{{- end }}
{{- end -}}

{{/*
The ServiceAccount a pod runs as: serviceAccount's (made by the chart or yours); else, for the
coordinator with discovery: kubernetes, its own; else none (the namespace's default).
*/}}
{{- define "axis.sharedServiceAccount" -}}
{{- $sa := .Values.serviceAccount -}}
{{- if $sa.create -}}{{ $sa.name | default (include "axis.fullname" .) }}{{- else -}}{{ $sa.name }}{{- end -}}
{{- end -}}

{{- define "axis.serviceAccountName" -}}
{{- with include "axis.sharedServiceAccount" .root -}}
{{ . }}
{{- else -}}
{{- if .kubernetesApi -}}{{ include "axis.fullname" .root }}-coordinator{{- end -}}
{{- end -}}
{{- end -}}
