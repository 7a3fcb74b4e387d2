#!/usr/bin/env bash
# Runs ferry's whole test suite on this machine (root; real etcd + kube-apiserver,
# runc + CRIU, QEMU, MinIO, network namespaces). Installs what is missing first.
. "$(dirname "$0")/lib.sh"

"$FERRY_ROOT/scripts/install-deps.sh"
. "$FERRY_CACHE/env.sh"
cd "$FERRY_ROOT"
start=$(date +%s)
# End-to-end tests start the workspace's binaries (ferry-node, ferry-launcher, ...).
cargo build --workspace --bins --locked
# Tests share 2 cores with real control planes and VMs: keep parallelism modest.
cargo test --workspace --locked -- --test-threads="${FERRY_TEST_THREADS:-4}"
if [ -x scripts/fuzz-transfer.sh ]; then
  scripts/fuzz-transfer.sh
fi
log "test suite finished in $(( $(date +%s) - start ))s"
