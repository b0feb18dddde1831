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
for target in set_cookie request_headers host_and_redirect config; do
  echo "== fuzz $target for ${seconds}s"
  cargo fuzz run "$target" --sanitizer none -- -max_total_time="$seconds" -print_final_stats=1 2>&1 \
    | grep -E '^(Done|stat::number_of_executed_units|stat::peak_rss_mb)|ERROR|panicked|SUMMARY' || true
  # libFuzzer exits non-zero and leaves an artifact on a failure.
  if compgen -G "fuzz/artifacts/$target/*" >/dev/null; then
    echo "error: fuzz target $target found a failing input:" >&2
    ls fuzz/artifacts/"$target" >&2
    exit 1
  fi
done
