#!/usr/bin/env bash
# Installs and builds everything ferry's tests, benchmarks and demo need, on a fresh
# Debian 12 machine with Go and Rust: Debian packages, the test control plane, CRIU,
# MinIO and the test guest. Every step is cached under $FERRY_CACHE, so a second run
# takes seconds. Writes the paths it produced to $FERRY_CACHE/env.sh (sourced by the
# other scripts).
. "$(dirname "$0")/lib.sh"

apt_install protobuf-compiler libprotobuf-dev iproute2 iptables runc busybox-static \
  qemu-system-x86 qemu-utils cpio zstd jq openssl curl ca-certificates pkg-config

env_file="$FERRY_CACHE/env.sh"
{
  echo "export FERRY_TESTENV_BIN=$("$FERRY_ROOT/scripts/build-testenv.sh")"
  for extra in install-criu.sh build-minio.sh build-test-guest.sh; do
    [ -x "$FERRY_ROOT/scripts/$extra" ] || continue
    "$FERRY_ROOT/scripts/$extra" >"$FERRY_CACHE/.$extra.out"
  done
} >"$env_file.tmp"
[ -f "$FERRY_CACHE/.build-minio.sh.out" ] && echo "export FERRY_MINIO=$(tail -1 "$FERRY_CACHE/.build-minio.sh.out")" >>"$env_file.tmp"
mv "$env_file.tmp" "$env_file"
log "dependencies ready ($env_file)"
