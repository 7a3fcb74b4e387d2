//go:build tools

// Package tools pins the kubelet that scripts/build-nodestack.sh builds for real test
// nodes. It is its own module (not testenv's) so that adding the kubelet does not change
// testenv's cache key; go.mod keeps testenv's Kubernetes version and replace directives.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
