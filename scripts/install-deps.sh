#!/usr/bin/env bash
# Installs and builds everything ferry's tests, benchmarks and demo need, on a fresh
# Debian 12 machine with Go and Rust: Debian packages, the test control plane, the node
# stack for real test nodes (kubelet, containerd, CNI plugins, crictl), CRIU, MinIO, Helm and
# the test guest. Every step is cached under $FERRY_CACHE, so a second run
# takes seconds. Writes what it produced to $FERRY_CACHE/env.sh (sourced by the other
# scripts).
. "$(dirname "$0")/lib.sh"

apt_install protobuf-compiler libprotobuf-dev iproute2 iptables runc busybox-static \
  cpio zstd jq openssl curl ca-certificates pkg-config gcc libc6-dev \
  fonts-dejavu-core  # ferry-bench --plots draws its text with DejaVu Sans
# QEMU >= 8 from bookworm-backports (Debian 12's 7.2 corrupts busy guests under TCG).
"$FERRY_ROOT/scripts/install-qemu.sh" >/dev/null

# Each build script prints what it produced on its last stdout line. (Assignments, not
# `echo "$(...)"`, so that a failing build stops this script.)
testenv_bin=$("$FERRY_ROOT/scripts/build-testenv.sh" | tail -n 1)
nodestack_bin=$("$FERRY_ROOT/scripts/build-nodestack.sh" | tail -n 1)
criu=$("$FERRY_ROOT/scripts/install-criu.sh" | tail -n 1)
minio=$("$FERRY_ROOT/scripts/build-minio.sh" | tail -n 1)
helm=$("$FERRY_ROOT/scripts/build-helm.sh" | tail -n 1)
guest=""
if [ -x "$FERRY_ROOT/scripts/build-test-guest.sh" ]; then
  guest=$("$FERRY_ROOT/scripts/build-test-guest.sh" | tail -n 1)
fi
{
  echo "export FERRY_TESTENV_BIN=$testenv_bin"
  echo "export FERRY_NODESTACK_BIN=$nodestack_bin"
  echo "export FERRY_CRIU=$criu"
  echo "export FERRY_MINIO=$minio"
  echo "export FERRY_HELM=$helm"
  [ -z "$guest" ] || echo "export FERRY_GUEST_DIR=$guest"
} >"$FERRY_CACHE/env.sh.tmp"
mv "$FERRY_CACHE/env.sh.tmp" "$FERRY_CACHE/env.sh"
log "dependencies ready:"
sed 's/^export /  /' "$FERRY_CACHE/env.sh" >&2
