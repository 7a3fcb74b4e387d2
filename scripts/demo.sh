#!/usr/bin/env bash
# The local demo: two Kubernetes control planes (east, west), ferry's controller and node
# daemons on network-namespace nodes, a container (CRIU) and a VM (QEMU) migrated between
# the clusters, and the measured downtimes. Installs what is missing first. Pass --keep to look around after.
. "$(dirname "$0")/lib.sh"

"$FERRY_ROOT/scripts/install-deps.sh"
. "$FERRY_CACHE/env.sh"
cd "$FERRY_ROOT"
cargo build --workspace --bins --locked -q
exec "$CARGO_TARGET_DIR/debug/ferry-demo" "$@"
