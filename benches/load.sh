#!/usr/bin/env bash
# The side-by-side load benchmark in one command on a fresh Debian machine: installs the contenders and
# load generators, builds portcullis and the bench upstream, runs benches/load.py (rounds interleaved)
# and writes the report to target/bench-report.md. Usage: benches/load.sh [--rounds N] [--seconds S]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install-packages.sh
install_commands nginx:nginx haproxy:haproxy caddy:caddy wrk:wrk h2load:nghttp2-client openssl:openssl curl:curl taskset:util-linux
if [ ! -x target/test-venv/bin/gunicorn ]; then
  python3 -m venv target/test-venv
  target/test-venv/bin/pip install --quiet 'django>=5.2,<6' 'gunicorn>=23'
fi
cargo build --release --locked --bin portcullis --example bench_upstream
python3 benches/load.py "$@" | tee target/bench-report.md
