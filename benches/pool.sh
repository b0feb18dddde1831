#!/usr/bin/env bash
# Does the upstream pool churn under more concurrent streams than idle slots, or under POSTs (issue 15)? Installs h2load
# if missing, builds the release binary and the bench upstream, runs benches/pool.py.
# Usage: benches/pool.sh [--rounds N] [--seconds S]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install-packages.sh
install_commands h2load:nghttp2-client openssl:openssl taskset:util-linux
cargo build --release --locked --bin portcullis --example bench_upstream
python3 benches/pool.py "$@"
