# Sourced by the scripts: `install_packages PKG...` installs Debian packages that are missing (root
# needed, or the caller is told which to install), quietly, failing loudly if apt does.
install_packages() {
  (($#)) || return 0
  echo "installing from Debian: $*"
  if [ "$(id -u)" -ne 0 ]; then
    echo "error: need root to install $* (or install them yourself)" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# `install_commands COMMAND:PACKAGE...`: installs the Debian package of each command not on PATH.
install_commands() {
  local need=() tool
  for tool in "$@"; do
    command -v "${tool%%:*}" >/dev/null || need+=("${tool#*:}")
  done
  install_packages "${need[@]}"
}
