#!/usr/bin/env bash
# System calls per request under strace, portcullis against nginx and HAProxy (issue 15): what each
# server asks of the kernel for the same request. Installs strace, nginx, HAProxy and h2load if
# missing, builds the release binary and the bench upstream, runs benches/syscalls.py.
# Usage: benches/syscalls.sh [--requests N] [--only portcullis,nginx]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install-packages.sh
install_commands strace:strace nginx:nginx haproxy:haproxy h2load:nghttp2-client openssl:openssl curl:curl taskset:util-linux
cargo build --release --locked --bin portcullis --example bench_upstream
python3 benches/syscalls.py "$@"
