#!/usr/bin/env bash
# Builds Helm (the chart's tests: lint, template) from its Go module at a pinned
# version, cached under $FERRY_CACHE/helm/<version> (a second run does not rebuild it).
# Prints the binary's path.
. "$(dirname "$0")/lib.sh"

version=v4.3.2
out="$FERRY_CACHE/helm/$version"
if [ ! -x "$out/helm" ]; then
  log "building helm $version from its Go module (about 5 minutes the first time)"
  rm -rf "$out.tmp" && mkdir -p "$out.tmp"
  (cd "$FERRY_CACHE" && GOBIN="$out.tmp" go install -trimpath \
    -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=$version" \
    "helm.sh/helm/v4/cmd/helm@$version")
  rm -rf "$out" && mv "$out.tmp" "$out"
fi
echo "$out/helm"
