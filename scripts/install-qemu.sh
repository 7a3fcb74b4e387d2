#!/usr/bin/env bash
# Installs QEMU >= 8 (qemu-system-x86, qemu-utils) from bookworm-backports.
#
# Why not Debian 12's QEMU 7.2: under TCG, a guest that dirties memory while it migrates
# arrives corrupted (stale stack/page contents: the destination kernel oopses within
# seconds, e.g. a NULL store in chacha_permute from a register reloaded off the stack).
# Reproduced with plain qemu-system-x86_64 outside ferry, also with thread=single;
# backports' QEMU 10.0 migrates the same guest cleanly. An idle guest migrates fine on
# both, so this matters for every busy-guest and post-copy test.
#
# Only the QEMU packages (and their firmware, seabios/ipxe) are pinned to backports; the
# source is otherwise at backports' default priority 100, so nothing else gets upgraded.
# Idempotent: a second run only checks the version. Prints the qemu binary's path.
. "$(dirname "$0")/lib.sh"

QEMU_MIN_MAJOR=8
src=/etc/apt/sources.list.d/ferry-backports.sources
pin=/etc/apt/preferences.d/ferry-qemu-backports

qemu_major() {
  qemu-system-x86_64 --version 2>/dev/null | awk '/version/ {split($4, v, "."); print v[1]; exit}'
}

major="$(qemu_major || true)"
if [ -n "$major" ] && [ "$major" -ge "$QEMU_MIN_MAJOR" ] && dpkg -s qemu-utils >/dev/null 2>&1; then
  command -v qemu-system-x86_64
  exit 0
fi

if [ ! -f "$src" ]; then
  cat >"$src" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
fi
cat >"$pin.tmp" <<'EOF'
# ferry: QEMU (and its firmware) from bookworm-backports; see scripts/install-qemu.sh.
Package: qemu-* seabios ipxe-qemu
Pin: release n=bookworm-backports
Pin-Priority: 990
EOF
mv "$pin.tmp" "$pin"
log "apt-get update (bookworm-backports for QEMU)"
apt-get update -qq
touch "$FERRY_CACHE/.apt-updated"
log "installing QEMU from bookworm-backports"
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  qemu-system-x86 qemu-utils >/dev/null

major="$(qemu_major || true)"
if [ -z "$major" ] || [ "$major" -lt "$QEMU_MIN_MAJOR" ]; then
  log "QEMU is $(qemu-system-x86_64 --version | head -n1), need >= $QEMU_MIN_MAJOR"
  apt-cache policy qemu-system-x86 >&2
  exit 1
fi
log "$(qemu-system-x86_64 --version | head -n1)"
command -v qemu-system-x86_64
