#!/usr/bin/env bash
# Runs every test, including those against real external programs: curl, pebble (Let's Encrypt's test
# ACME server), a Django app under Gunicorn, Chromium, systemd-analyze, HAProxy, GoAccess, fail2ban-regex,
# redis-server and podman (the container image, scripts/image.sh). Installs what is missing
# (Debian packages, Django + Gunicorn from PyPI into target/test-venv, playwright-core from npm into
# tests/browser) and fails loudly if anything is still missing.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v curl >/dev/null || missing+=(curl)
command -v pebble >/dev/null || missing+=(pebble)
command -v openssl >/dev/null || missing+=(openssl)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
command -v chromium >/dev/null || missing+=(chromium)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v haproxy >/dev/null || missing+=(haproxy)
command -v goaccess >/dev/null || missing+=(goaccess)
command -v fail2ban-regex >/dev/null || missing+=(fail2ban)
command -v redis-server >/dev/null || missing+=(redis-server)
source scripts/install-packages.sh
install_packages "${missing[@]}"

venv="$PWD/target/test-venv"
if ! "$venv/bin/python" -c 'import django, gunicorn' 2>/dev/null; then
  echo "creating $venv with Django 5.2 LTS and Gunicorn"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'django>=5.2,<6' 'gunicorn>=23'
fi

# playwright-core drives Debian's Chromium; it downloads no browser of its own.
browser="$PWD/tests/browser"
if [ ! -d "$browser/node_modules/playwright-core" ]; then
  echo "installing playwright-core into $browser/node_modules"
  npm ci --prefix "$browser" --no-audit --no-fund --silent
fi

for program in curl openssl pebble pebble-challtestsrv chromium node systemd-analyze haproxy goaccess fail2ban-regex redis-server "$venv/bin/gunicorn" \
  "$browser/node_modules/playwright-core/cli.js"; do
  if ! command -v "$program" >/dev/null; then
    echo "error: $program is still missing; the tests that need it would not run" >&2
    exit 1
  fi
done

# The container image, built from the Dockerfile with podman on bases made from Debian packages.
export PORTCULLIS_TEST_IMAGE="localhost/portcullis:test"
scripts/image.sh "$PORTCULLIS_TEST_IMAGE"

export PORTCULLIS_TEST_VENV="$venv"
export PORTCULLIS_TEST_NODE_MODULES="$browser/node_modules"
export PORTCULLIS_TEST_CHROMIUM="$(command -v chromium)"
# --include-ignored runs the tests that need the programs above; plain `cargo test` skips only those.
log="target/test-output.log"
mkdir -p target
cargo test --locked -- --include-ignored 2>&1 | tee "$log"
# One closing line for every test binary together (the last binary, the doc tests, has none of its own).
awk '/^test result:/ { passed += $4; failed += $6 } END { printf "tests: %d passed, %d failed\n", passed, failed }' \
  "$log" | tee target/test-summary.txt
