{{- define "ferry.labels" -}}
app.kubernetes.io/name: ferry
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "ferry.image" -}}
{{- $img := index .root.Values.image .component -}}
{{- $repo := $img.repository -}}
{{- if .root.Values.image.registry }}{{ $repo = printf "%s/%s" .root.Values.image.registry $repo }}{{ end -}}
{{ $repo }}:{{ $img.tag | default .root.Chart.AppVersion }}
{{- end }}

{{- /* The cluster's nodes as [{name, ip}] (JSON), ip being the first InternalIP: every
       node gets a daemon identity. Empty under `helm template` (no cluster to ask). */}}
{{- define "ferry.nodes" -}}
{{- $out := list }}
{{- range (lookup "v1" "Node" "" "").items | default list }}
{{- $ip := "" }}
{{- range .status.addresses }}{{ if and (eq .type "InternalIP") (not $ip) }}{{ $ip = .address }}{{ end }}{{ end }}
{{- if $ip }}{{ $out = append $out (dict "name" .metadata.name "ip" $ip) }}{{ end }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{- /* The node daemon's and ferry-install's environment (the downward API and the
       install settings; ferry-install and ferry-node read the same names). */}}
{{- define "ferry.installEnv" -}}
{{- $p := .Values.node.paths -}}
- {name: NODE_NAME, valueFrom: {fieldRef: {fieldPath: spec.nodeName}}}
- {name: HOST_IP, valueFrom: {fieldRef: {fieldPath: status.hostIP}}}
- {name: POD_NAMESPACE, valueFrom: {fieldRef: {fieldPath: metadata.namespace}}}
- {name: FERRY_HOST_ROOT, value: /}
- {name: FERRY_HOST_BIN_DIR, value: {{ $p.binDir | quote }}}
- {name: FERRY_CONTAINERD_DROPIN, value: {{ $p.containerdDropin | quote }}}
- {name: FERRY_HOST_RUNC, value: {{ $p.hostRunc | quote }}}
- {name: FERRY_HOST_CRIU, value: {{ $p.hostCriu | quote }}}
- {name: FERRY_STATE_DIR, value: {{ $p.stateDir | quote }}}
- {name: FERRY_HANDLER_RUNC_ROOT, value: {{ $p.handlerRuncRoot | quote }}}
- {name: FERRY_CREATE_WAIT_SECONDS, value: {{ .Values.node.createWaitSeconds | quote }}}
- {name: FERRY_CONTAINERD_RESTART, value: {{ .Values.node.containerdRestart | quote }}}
{{- include "ferry.apiEnv" . }}
{{- end }}

{{- define "ferry.apiEnv" -}}
{{- with .Values.kubernetesAPI.host }}
- {name: KUBERNETES_SERVICE_HOST, value: {{ . | quote }}}
- {name: KUBERNETES_SERVICE_PORT, value: {{ required "kubernetesAPI.port is required with kubernetesAPI.host" $.Values.kubernetesAPI.port | quote }}}
{{- end }}
{{- end }}

{{- define "ferry.hostMounts" -}}
{{- range $i, $d := .Values.node.hostMounts }}
- {name: host-{{ $i }}, mountPath: {{ $d }}, mountPropagation: HostToContainer}
{{- end }}
{{- end }}
