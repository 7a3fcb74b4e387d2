#!/usr/bin/env bash
# Builds ferry's VM test guest: Debian 12's cloud kernel + a busybox-static initramfs whose
# /init runs a workload with checkable state (a counter printed once a second on ttyS0) and
# (with `ferry.dirty=1` on the cmdline) a loop that keeps dirtying guest memory.
# Output: $FERRY_CACHE/guest/<key>/{vmlinuz,initramfs.gz,cmdline}; prints that directory.
# Running it needs QEMU >= 8 for busy-guest migration: scripts/install-qemu.sh.
. "$(dirname "$0")/lib.sh"

apt_install busybox-static cpio
# The guest is only useful with a QEMU that migrates it intact (see install-qemu.sh).
"$FERRY_ROOT/scripts/install-qemu.sh" >/dev/null

# The cloud flavour is small and has the 8250 serial console and virtio built in.
KPKG="$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-6/ {print $2; exit}')"
KVER="$(apt-cache policy "$KPKG" | awk '/Candidate:/ {print $2}')"
[ -n "$KPKG" ] && [ -n "$KVER" ] || { log "cannot resolve the Debian cloud kernel package"; exit 1; }

INIT_SCRIPT="$(cat <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/shm && mount -t tmpfs -o size=200m shm /dev/shm
echo "ferry-guest: up"
# Memory dirtier (opt-in with `ferry.dirty=1` on the kernel cmdline): rewrites a 64 MiB
# tmpfs file continuously with random (incompressible, non-zero) data. The data is made
# once and then copied: generating it with /dev/urandom in the loop is CPU-bound under
# TCG (~17 MB/s), barely above a slow test link, while copying dirties several times
# faster, so a throttled link reliably cannot keep up. Truncating the file on every
# round frees its pages, so over time the dirty pages wander over all free guest memory.
# The seed never changes after boot: its checksum, printed every 5 counts as `sum HEX`,
# must be the same before and after a migration (the guest's memory arrived intact).
dd if=/dev/urandom of=/dev/shm/seed bs=1M count=32 2>/dev/null
if grep -q 'ferry.dirty=1' /proc/cmdline; then
  ( while true; do cat /dev/shm/seed /dev/shm/seed > /dev/shm/x; done ) &
  echo "ferry-guest: dirtier on"
fi
# The checkable state: a counter that must keep increasing across a migration.
n=0
while true; do
  n=$((n+1))
  echo "count $n" > /dev/ttyS0
  [ $((n % 5)) -eq 1 ] && echo "sum $(md5sum < /dev/shm/seed | cut -c1-16)" > /dev/ttyS0
  sleep 1
done
INIT
)"

KEY="$( { echo "$KPKG $KVER"; echo "$INIT_SCRIPT"; sha256sum /bin/busybox; } | sha256sum | cut -c1-16)"
OUT="$FERRY_CACHE/guest/$KEY"
if [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initramfs.gz" ]; then
  echo "$OUT"; exit 0
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
log "downloading $KPKG $KVER"
(cd "$WORK" && apt-get download -qq "$KPKG=$KVER" >/dev/null)
dpkg-deb -x "$WORK"/"$KPKG"_*.deb "$WORK/kernel"

ROOT="$WORK/initramfs"
mkdir -p "$ROOT"/{bin,proc,sys,dev,tmp}
cp /bin/busybox "$ROOT/bin/busybox"
printf '%s\n' "$INIT_SCRIPT" > "$ROOT/init"
chmod +x "$ROOT/init"
(cd "$ROOT" && find . | cpio -o -H newc --quiet | gzip -9) > "$WORK/initramfs.gz"

mkdir -p "$OUT.tmp"
cp "$WORK"/kernel/boot/vmlinuz-* "$OUT.tmp/vmlinuz"
cp "$WORK/initramfs.gz" "$OUT.tmp/initramfs.gz"
echo "console=ttyS0 quiet panic=-1" > "$OUT.tmp/cmdline"
rm -rf "$OUT" && mv "$OUT.tmp" "$OUT"
log "test guest in $OUT"
echo "$OUT"
