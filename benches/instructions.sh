#!/usr/bin/env bash
# Instructions per request under callgrind, portcullis against nginx and HAProxy (issue 15): a count that
# noise on a shared machine hardly moves. Installs valgrind, nginx, HAProxy and h2load if missing, builds
# the release binary and the bench upstream, runs benches/instructions.py.
# Usage: benches/instructions.sh [--requests N] [--only portcullis,nginx]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install-packages.sh
install_commands valgrind:valgrind nginx:nginx haproxy:haproxy h2load:nghttp2-client openssl:openssl curl:curl taskset:util-linux
cargo build --release --locked --bin portcullis --example bench_upstream
python3 benches/instructions.py "$@"
