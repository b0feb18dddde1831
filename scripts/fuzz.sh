#!/usr/bin/env bash
# Fuzzes every target in fuzz/ with libFuzzer for SECONDS each (default 15), on the stable toolchain
# (no sanitizer: the properties themselves are the oracle; the crate forbids unsafe code).
# Usage: scripts/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-15}"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz from crates.io"
  cargo install --locked cargo-fuzz
fi
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
for target in set_cookie request_headers host_and_redirect path_normalisation config proxy_header; do
  echo "== fuzz $target for ${seconds}s"
  # libFuzzer exits non-zero and writes fuzz/artifacts/<target>/crash-* when a property fails.
  if ! cargo fuzz run "$target" --sanitizer none -- -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1; then
    grep -E 'panicked|ERROR|SUMMARY|Test unit written' "$log" >&2 || tail -n 30 "$log" >&2
    echo "error: fuzz target $target failed" >&2
    exit 1
  fi
  grep -E '^Done' "$log"
done
