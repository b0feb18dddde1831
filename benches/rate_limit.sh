#!/usr/bin/env bash
# What a shared login budget costs (issue 11): installs wrk and redis-server if missing, builds the
# release binary and the bench upstream, runs benches/rate_limit.py. Usage: benches/rate_limit.sh [--rounds N] [--seconds S]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install-packages.sh
install_commands wrk:wrk redis-server:redis-server redis-cli:redis-tools openssl:openssl taskset:util-linux
cargo build --release --locked --bin portcullis --example bench_upstream
python3 benches/rate_limit.py "$@"
