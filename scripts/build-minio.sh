#!/usr/bin/env bash
# Builds MinIO (the S3 server transfer tests and benchmarks run against) from its Go
# module and caches the binary under $FERRY_CACHE/minio/<version>/minio.
# MinIO publishes no semver tags (its tags are RELEASE.*), so the pin is the Go module
# pseudo-version of a commit; bump MINIO_VERSION to move it.
# Prints the binary's path. A second run with the same version does nothing.
. "$(dirname "$0")/lib.sh"

MINIO_VERSION="${MINIO_VERSION:-v0.0.0-20260212201848-7aac2a2c5b7c}"
out="$FERRY_CACHE/minio/$MINIO_VERSION"
if [ -x "$out/minio" ]; then
  echo "$out/minio"
  exit 0
fi
command -v go >/dev/null || { log "go is required (Go 1.24+) to build MinIO"; exit 1; }
mkdir -p "$out/bin.tmp"
log "building MinIO $MINIO_VERSION from its Go module (takes several minutes)"
# CGO off: a static binary that does not depend on the build machine's libc.
CGO_ENABLED=0 GOBIN="$out/bin.tmp" GOFLAGS=-trimpath \
  go install -ldflags "-s -w" "github.com/minio/minio@$MINIO_VERSION"
mv "$out/bin.tmp/minio" "$out/minio"
rm -rf "$out/bin.tmp"
echo "$out/minio"
