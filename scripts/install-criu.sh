#!/usr/bin/env bash
# Installs CRIU 4.x (built from Debian's source package of a newer suite), runc and the
# iptables tools CRIU needs, and checks that `criu check` passes.
#
# Why a source build: Debian 12's CRIU 3.17 fails on the 6.x kernels we run (dump and
# restore of even a plain process break); sid's 4.x source builds fine against
# bookworm's libraries. It must be >= 4.2: on kernels >= 6.16 getsockopt(SO_PASSCRED)
# fails on TCP sockets, which makes CRIU 4.1 fail to dump any container with a socket.
# We build only the `criu` binary (no docs, no tests) and cache it
# under $FERRY_CACHE/criu/<version>/criu, then install it as /usr/local/sbin/criu so
# runc (which looks criu up on PATH) finds it. A second run only re-checks.
# Prints the installed binary's path.
. "$(dirname "$0")/lib.sh"

CRIU_SUITE="${CRIU_SUITE:-sid}"
# Pin the upstream version; the debian revision may move with the suite.
CRIU_VERSION="${CRIU_VERSION:-4.2.1}"
out="$FERRY_CACHE/criu/$CRIU_VERSION"

# Runtime tools: runc, iptables (CRIU locks the network with iptables/nft while it dumps
# TCP connections), the shared libraries the binary links against, busybox-static (test
# containers' rootfs) and gcc + static libc (the benchmark's memory-holding workload).
apt_install runc iptables nftables libprotobuf-c1 libnl-3-200 libnet1 libcap2 libaio1 \
  libgnutls30 libbsd0 libnftables1 uuid-runtime busybox-static gcc libc6-dev

if [ ! -x "$out/criu" ]; then
  apt_install build-essential pkg-config dpkg-dev libprotobuf-dev libprotobuf-c-dev \
    protobuf-c-compiler protobuf-compiler python3-protobuf libnl-3-dev libnl-route-3-dev \
    libnet1-dev libcap-dev libaio-dev libgnutls28-dev libbsd-dev libnftables-dev \
    uuid-dev libdrm-dev gcc make
  src_list=/etc/apt/sources.list.d/ferry-criu-src.list
  if [ ! -f "$src_list" ]; then
    # Source lines only: no binary package from the newer suite gets installed.
    echo "deb-src http://deb.debian.org/debian $CRIU_SUITE main" >"$src_list"
    rm -f "$FERRY_CACHE/.apt-updated"
  fi
  apt-get update -qq
  touch "$FERRY_CACHE/.apt-updated"
  work="$FERRY_CACHE/criu/src.tmp"
  rm -rf "$work" && mkdir -p "$work"
  log "fetching criu source package from $CRIU_SUITE"
  # The mirror may lack the .dsc/.debian.tar.xz of a revision while it has the upstream
  # tarball; the upstream tarball is all `make criu` needs, so a partial fetch is fine.
  (cd "$work" && apt-get source --download-only -qq "criu/$CRIU_SUITE" >/dev/null 2>&1 || true)
  orig="$(ls "$work"/criu_*.orig.tar.* 2>/dev/null | head -1 || true)"
  [ -n "$orig" ] || { log "could not fetch the criu source package from $CRIU_SUITE"; exit 1; }
  got="$(basename "$orig" | sed -n 's/^criu_\([0-9.]*\)\.orig.*/\1/p')"
  mkdir -p "$work/src" && tar -xf "$orig" -C "$work/src" --strip-components=1
  deb="$(ls "$work"/criu_*.debian.tar.* 2>/dev/null | head -1 || true)"
  if [ -n "$deb" ]; then
    tar -xf "$deb" -C "$work/src"
    if [ -f "$work/src/debian/patches/series" ]; then
      (cd "$work/src" && while read -r p; do
        case "$p" in ''|'#'*) continue ;; esac
        patch -p1 -s <"debian/patches/$p"
      done <debian/patches/series)
    fi
  fi
  if [ "$got" != "$CRIU_VERSION" ]; then
    log "warning: $CRIU_SUITE ships criu $got, expected $CRIU_VERSION; building $got"
    out="$FERRY_CACHE/criu/$got"
  fi
  log "building criu $got (takes a few minutes)"
  # Only the binary: the default target also builds docs (asciidoc) and the pycriu lib.
  make -C "$work/src" -j"$(nproc)" criu >"$work/build.log" 2>&1 || {
    tail -40 "$work/build.log" >&2
    log "criu build failed; full log in $work/build.log"
    exit 1
  }
  mkdir -p "$out"
  install -m 0755 "$work/src/criu/criu" "$out/criu.tmp" && mv "$out/criu.tmp" "$out/criu"
  rm -rf "$work"
fi

# Install where runc and our daemon find it (PATH order puts /usr/local first).
if ! cmp -s "$out/criu" /usr/local/sbin/criu; then
  install -m 0755 "$out/criu" /usr/local/sbin/criu
fi
# Debian's old criu (if present) must not shadow ours.
if dpkg -s criu >/dev/null 2>&1; then
  log "note: Debian's criu package is installed; /usr/local/sbin/criu takes precedence"
fi

# Post-copy: CRIU's lazy page server (source side) grows a pipe to 4 MiB and ignores the
# failure; without CAP_SYS_RESOURCE (as in this sandbox) that needs fs.pipe-max-size
# >= 4 MiB, else every page request fails with `page-pipe: splice: -1: Bad file
# descriptor`. ferry-node's strategy probe reports post-copy unavailable in that case.
lazy_pipe=4194304
if [ "$(cat /proc/sys/fs/pipe-max-size)" -lt "$lazy_pipe" ]; then
  echo "$lazy_pipe" >/proc/sys/fs/pipe-max-size || log "warning: cannot raise fs.pipe-max-size; post-copy stays unavailable"
fi

if ! /usr/local/sbin/criu check >"$FERRY_CACHE/criu/check.log" 2>&1; then
  cat "$FERRY_CACHE/criu/check.log" >&2
  log "criu check failed"
  exit 1
fi
echo /usr/local/sbin/criu
