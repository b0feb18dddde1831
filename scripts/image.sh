#!/usr/bin/env bash
# Builds the container image from the real Dockerfile with podman. With no Docker Hub here
# (../shared/docs/containers.md), the two base images are made from Debian 12 packages: a build image
# carrying this machine's Rust toolchain, and a distroless-like runtime (glibc, libgcc, CA roots, no shell).
# Usage: scripts/image.sh [TAG]   (default localhost/portcullis:test); prints the tag and the image size.
set -euo pipefail
cd "$(dirname "$0")/.."
tag="${1:-localhost/portcullis:test}"

missing=()
for program in podman runc mmdebstrap; do
  command -v "$program" >/dev/null || missing+=("$program")
done
source scripts/install-packages.sh
install_packages "${missing[@]}"
# crun fails here ("cgroups in hybrid mode not supported"); these flags are what works (containers.md).
podman=(podman --runtime runc)
limits=(--network host --ulimit nofile=1024:1024 --ulimit nproc=1024:1024)

toolchain="$(rustc --print sysroot)"
version="$(rustc --version | awk '{print $2}')"
build_base="localhost/portcullis-build:bookworm-rust-$version"
runtime_base="localhost/portcullis-runtime:bookworm"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

if ! "${podman[@]}" image exists "$build_base"; then
  echo "making $build_base from Debian packages and the toolchain in $toolchain"
  mmdebstrap --quiet --variant=minbase --include=ca-certificates,gcc,libc6-dev,libcap2-bin \
    --customize-hook="mkdir -p \"\$1/usr/local/rust\" && cp -a '$toolchain/bin' '$toolchain/lib' \"\$1/usr/local/rust/\"" \
    bookworm "$work/build.tar"
  "${podman[@]}" import --quiet \
    --change "ENV PATH=/usr/local/rust/bin:/usr/local/cargo/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --change "ENV CARGO_HOME=/usr/local/cargo" \
    "$work/build.tar" "$build_base" >/dev/null
  rm -f "$work/build.tar"
fi
if ! "${podman[@]}" image exists "$runtime_base"; then
  echo "making $runtime_base from Debian packages (libc6, libgcc-s1, CA roots)"
  # `extract` unpacks just these packages: no dpkg, no apt, no shell, like distroless/cc.
  mmdebstrap --quiet --variant=extract --include=libc6,libgcc-s1,base-files \
    --customize-hook='mkdir -p "$1/etc/ssl/certs" "$1/tmp" && chmod 1777 "$1/tmp"' \
    --customize-hook='cp /etc/ssl/certs/ca-certificates.crt "$1/etc/ssl/certs/"' \
    --customize-hook='printf "root:x:0:0:root:/root:/sbin/nologin\nportcullis:x:10001:10001:portcullis:/nonexistent:/sbin/nologin\n" > "$1/etc/passwd"' \
    --customize-hook='printf "root:x:0:\nportcullis:x:10001:\n" > "$1/etc/group"' \
    bookworm "$work/runtime.tar"
  "${podman[@]}" import --quiet "$work/runtime.tar" "$runtime_base" >/dev/null
fi

# tests/container.rs runs the compose example's shape: this stands in for the Django app's image.
app_image="localhost/portcullis-test-app:bookworm"
if ! "${podman[@]}" image exists "$app_image"; then
  echo "making $app_image (python3) for the compose check"
  mmdebstrap --quiet --variant=minbase --include=python3,ca-certificates bookworm "$work/app.tar"
  "${podman[@]}" import --quiet "$work/app.tar" "$app_image" >/dev/null
  rm -f "$work/app.tar"
fi

echo "building $tag from the Dockerfile"
# The host's crate cache is lent to the build, so nothing is downloaded twice.
mkdir -p "${CARGO_HOME:-$HOME/.cargo}/registry"
"${podman[@]}" build --quiet "${limits[@]}" \
  --volume "${CARGO_HOME:-$HOME/.cargo}/registry:/usr/local/cargo/registry" \
  --build-arg RUST_IMAGE="$build_base" --build-arg RUNTIME_IMAGE="$runtime_base" \
  --tag "$tag" . >/dev/null
size="$("${podman[@]}" image inspect "$tag" --format '{{.Size}}')"
echo "image $tag: $((size / 1000000)) MB"
