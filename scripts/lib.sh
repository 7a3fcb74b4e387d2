# Shared helpers for ferry's scripts. Source it: `. "$(dirname "$0")/lib.sh"`.
set -euo pipefail

FERRY_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Heavy, versioned build outputs live outside the work tree so a fresh clone reuses them.
FERRY_CACHE="${FERRY_CACHE:-/var/cache/ferry}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$FERRY_CACHE/target}"
mkdir -p "$FERRY_CACHE"

log() { printf '\033[1m[ferry]\033[0m %s\n' "$*" >&2; }

# Key for a cache entry: a hash of the files that decide its content.
cache_key() { cat "$@" | sha256sum | cut -c1-16; }

apt_install() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    if [ ! -f "$FERRY_CACHE/.apt-updated" ] || [ -n "$(find "$FERRY_CACHE/.apt-updated" -mmin +720)" ]; then
      apt-get update -qq && touch "$FERRY_CACHE/.apt-updated"
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}
