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
results="$FERRY_CACHE/last-test-run.log"
status=0
cargo test --workspace --locked --no-fail-fast -- --test-threads="${FERRY_TEST_THREADS:-4}" 2>&1 | tee "$results" || status=$?
fuzz=ok
scripts/fuzz-transfer.sh || { status=$?; fuzz="FAILED (see above)"; }
log "test suite finished in $(( $(date +%s) - start ))s"
# Closing lines: tests summed over every test binary, then the fuzzing result.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' "$results"
echo "frame decoder fuzzing: $fuzz"
exit "$status"
