#!/usr/bin/env bash
# Builds the node stack for real test nodes (see docs/testenv.md) from Go modules:
#   kubelet, kube-proxy   k8s.io/kubernetes (version and replace directives of
#                    nodestack/kubelet/go.mod, which follows testenv/go.mod); kube-proxy
#                    serves the Services of the client-gap measurement (docs/benchmarks.md)
#   containerd, containerd-shim-runc-v2, ctr   github.com/containerd/containerd/v2
#   bridge, host-local, loopback               github.com/containernetworking/plugins
#   crictl                                     sigs.k8s.io/cri-tools
# The OCI runtime is Debian's runc (apt package runc); CRIU comes from install-criu.sh.
# Cached by the versions below + nodestack/kubelet/go.{mod,sum} under
# $FERRY_CACHE/nodestack/<key>/bin (a second run builds nothing);
# $FERRY_CACHE/nodestack/bin links to the current set. Prints that directory.
. "$(dirname "$0")/lib.sh"

CONTAINERD_VERSION=v2.4.2
CNI_PLUGINS_VERSION=v1.10.0
CRI_TOOLS_VERSION=v1.34.0
# Bump when the build flags below change (comments may change freely).
RECIPE=2

cd "$FERRY_ROOT/nodestack/kubelet"
key=$(cache_key <(echo "$RECIPE $CONTAINERD_VERSION $CNI_PLUGINS_VERSION $CRI_TOOLS_VERSION") go.mod go.sum)
out="$FERRY_CACHE/nodestack/$key/bin"
if [ ! -x "$out/kubelet" ]; then
  tmp="$out.tmp" && rm -rf "$tmp" && mkdir -p "$tmp"
  start=$SECONDS

  k8s_version=$(go list -m -f "{{.Version}}" k8s.io/kubernetes)
  minor=$(echo "$k8s_version" | cut -d. -f2)
  log "building kubelet and kube-proxy $k8s_version (a few minutes without a warm Go build cache)"
  # Same flags and environment as build-testenv.sh, so packages shared with the
  # control plane come from the Go build cache.
  go build -trimpath -o "$tmp/" -ldflags "-s -w \
    -X k8s.io/component-base/version.gitVersion=$k8s_version \
    -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor" \
    k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy

  # The others have no replace directives: `go install module@version` builds them
  # exactly as their own go.mod pins them.
  log "building containerd $CONTAINERD_VERSION"
  ctrd=github.com/containerd/containerd/v2
  ctrd_ldflags="-s -w -X $ctrd/version.Version=$CONTAINERD_VERSION -X $ctrd/version.Package=$ctrd"
  # Pure Go (no btrfs snapshotter, which needs cgo and its headers); the shim without
  # gRPC, as containerd's Makefile builds it.
  CGO_ENABLED=0 GOBIN="$tmp" go install -trimpath -tags "urfave_cli_no_docs no_btrfs" \
    -ldflags "$ctrd_ldflags" "$ctrd/cmd/containerd@$CONTAINERD_VERSION" "$ctrd/cmd/ctr@$CONTAINERD_VERSION"
  CGO_ENABLED=0 GOBIN="$tmp" go install -trimpath -tags "urfave_cli_no_docs no_btrfs no_grpc" \
    -ldflags "$ctrd_ldflags" "$ctrd/cmd/containerd-shim-runc-v2@$CONTAINERD_VERSION"

  log "building CNI plugins $CNI_PLUGINS_VERSION"
  cni=github.com/containernetworking/plugins
  CGO_ENABLED=0 GOBIN="$tmp" go install -trimpath \
    -ldflags "-s -w -X $cni/pkg/utils/buildversion.BuildVersion=$CNI_PLUGINS_VERSION" \
    "$cni/plugins/main/bridge@$CNI_PLUGINS_VERSION" \
    "$cni/plugins/main/loopback@$CNI_PLUGINS_VERSION" \
    "$cni/plugins/ipam/host-local@$CNI_PLUGINS_VERSION"

  log "building crictl $CRI_TOOLS_VERSION"
  CGO_ENABLED=0 GOBIN="$tmp" go install -trimpath \
    -ldflags "-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version=$CRI_TOOLS_VERSION" \
    "sigs.k8s.io/cri-tools/cmd/crictl@$CRI_TOOLS_VERSION"

  "$tmp/kube-proxy" --version | grep -qx "Kubernetes $k8s_version" ||
    { log "kube-proxy reports '$("$tmp/kube-proxy" --version)', not $k8s_version"; exit 1; }
  "$tmp/kubelet" --version | grep -qx "Kubernetes $k8s_version" ||
    { log "kubelet reports '$("$tmp/kubelet" --version)', not $k8s_version"; exit 1; }
  rm -rf "$out" && mv "$tmp" "$out"
  log "node stack built in $((SECONDS - start)) s: $out"
fi
ln -sfn "$out" "$FERRY_CACHE/nodestack/bin"
echo "$FERRY_CACHE/nodestack/bin"
