#!/usr/bin/env bash
# What compression saves and costs (issue 15): installs wrk and curl if missing, Django into
# target/test-venv (for the admin's static files), builds the release binary, runs benches/compression.py.
# Usage: benches/compression.sh [--rounds N] [--seconds S]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install-packages.sh
install_commands wrk:wrk curl:curl openssl:openssl taskset:util-linux
if [ ! -x target/test-venv/bin/python ] || ! target/test-venv/bin/python -c 'import django' 2>/dev/null; then
  python3 -m venv target/test-venv
  target/test-venv/bin/pip install --quiet 'django>=5.2,<6' 'gunicorn>=23'
fi
# The same build as load.sh and rate_limit.sh, so the three share one binary.
cargo build --release --locked --bin portcullis --example bench_upstream
python3 benches/compression.py "$@"
