#!/usr/bin/env bash
# Builds the test control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl) from the Go modules pinned in testenv/go.mod, and the
# ferry-testenv runner. Control-plane binaries are cached by go.mod+go.sum under
# $FERRY_CACHE/testenv/<key>/bin (a second run does not rebuild them);
# $FERRY_CACHE/testenv/bin links to the current set. Prints that directory.
. "$(dirname "$0")/lib.sh"

cd "$FERRY_ROOT/testenv"
key=$(cache_key go.mod go.sum)
out="$FERRY_CACHE/testenv/$key/bin"
if [ ! -x "$out/kube-apiserver" ]; then
  k8s_version=$(awk '$1=="k8s.io/kubernetes"{print $2}' go.mod)
  minor=$(echo "$k8s_version" | cut -d. -f2)
  ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$k8s_version -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
  log "building control plane $k8s_version from Go modules (the first build takes 10+ minutes)"
  tmp="$out.tmp" && rm -rf "$tmp" && mkdir -p "$tmp"
  for cmd in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
    go build -trimpath -ldflags "$ldflags" -o "$tmp/" "k8s.io/kubernetes/cmd/$cmd"
  done
  go build -trimpath -ldflags "-s -w" -o "$tmp/etcd" go.etcd.io/etcd/server/v3
  rm -rf "$out" && mv "$tmp" "$out"
fi
# The runner is small and changes with the project: always (incrementally) rebuilt.
go build -trimpath -o "$out/ferry-testenv" ./cmd/ferry-testenv
ln -sfn "$out" "$FERRY_CACHE/testenv/bin"
echo "$FERRY_CACHE/testenv/bin"
