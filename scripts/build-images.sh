#!/usr/bin/env bash
# Builds ferry's images without a Docker engine: a release build of the binaries, then
# one-layer OCI archives (deterministic: the same binaries give the same digests) in
# $FERRY_CACHE/images/release (or $1), tagged with the workspace version (or $2).
# Import them into a node's containerd with `ctr -n k8s.io images import ARCHIVE`.
. "$(dirname "$0")/lib.sh"
"$FERRY_ROOT/scripts/install-deps.sh"
. "$FERRY_CACHE/env.sh"
cd "$FERRY_ROOT"
out="${1:-$FERRY_CACHE/images/release}"
start=$(date +%s)
cargo build --release --locked -p ferry-controller -p ferry-node --bins
target="${CARGO_TARGET_DIR:-$FERRY_ROOT/target}/release"
cargo run --release --locked -q -p ferry-testkit --bin ferry-images -- "$target" "$out" ${2:+"$2"}
log "images built in $(( $(date +%s) - start ))s (release build included)"
