#!/usr/bin/env bash
# What an idle keep-alive TLS connection costs (issue 15): portcullis, nginx and HAProxy with N idle
# connections each. Installs what is missing, builds the release binary and the bench upstream, runs
# benches/idle.py. Usage: benches/idle.sh [--connections N] [--rounds R] [--only a,b]
# (PORTCULLIS_BENCH_WRAP="heaptrack -o FILE" runs portcullis under heaptrack, from Debian's heaptrack.)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install-packages.sh
install_commands nginx:nginx haproxy:haproxy wrk:wrk openssl:openssl taskset:util-linux
cargo build --release --locked --bin portcullis --example bench_upstream
python3 benches/idle.py "$@"
