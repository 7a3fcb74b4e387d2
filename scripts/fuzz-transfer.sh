#!/usr/bin/env bash
# Fuzzes the direct protocol's frame decoder (ferry-transfer) for a bounded time.
#   FUZZ_SECS=60 (default) scripts/fuzz-transfer.sh
# With a nightly toolchain it runs the libFuzzer target transfer/fuzz (cargo-fuzz is
# installed once into $FERRY_CACHE/cargo-fuzz/<version>); without nightly it runs the
# stable, time-boxed mutation test tests/fuzz_frames.rs for the same time. Both drive
# ferry_transfer::frame::fuzz_decode. Prints the corpus directory (libFuzzer) or
# "stable" on stdout.
. "$(dirname "$0")/lib.sh"

FUZZ_SECS="${FUZZ_SECS:-60}"
CARGO_FUZZ_VERSION=0.13.1
cd "$FERRY_ROOT/transfer"

if [ "${FERRY_FUZZ_STABLE:-0}" != 1 ] && cargo +nightly --version >/dev/null 2>&1; then
  root="$FERRY_CACHE/cargo-fuzz/$CARGO_FUZZ_VERSION"
  if [ ! -x "$root/bin/cargo-fuzz" ]; then
    log "installing cargo-fuzz $CARGO_FUZZ_VERSION into $root"
    cargo install --locked --root "$root" "cargo-fuzz@$CARGO_FUZZ_VERSION" >&2
  fi
  export PATH="$root/bin:$PATH"
  corpus="$FERRY_CACHE/fuzz/transfer-frame_decoder"
  mkdir -p "$corpus"
  # The fuzz workspace builds into its own target dir: sanitizer flags differ from the
  # shared cache's normal builds.
  export CARGO_TARGET_DIR="$FERRY_CACHE/fuzz-target"
  log "libFuzzer on frame_decoder for ${FUZZ_SECS}s"
  cargo +nightly fuzz run --fuzz-dir fuzz frame_decoder "$corpus" -- \
    -max_total_time="$FUZZ_SECS" -max_len=65536 -rss_limit_mb=2048 >&2
  echo "$corpus"
else
  log "no nightly toolchain: stable mutation fuzzing for ${FUZZ_SECS}s"
  FERRY_FUZZ_SECS="$FUZZ_SECS" cargo test -p ferry-transfer --test fuzz_frames -- --nocapture >&2
  echo stable
fi
