#!/usr/bin/env bash
# A Debian package a test needs (Chromium for the browser test, HAProxy for R10):
#   ensure-debian-package.sh PACKAGE EXECUTABLE
# Installs PACKAGE with apt-get when EXECUTABLE is missing and we are root (updating
# the package lists once if the first try fails); otherwise says in one line what to
# install. Prints the executable's path.
set -euo pipefail
package=$1
executable=$2
if [ -x "$executable" ]; then
  echo "$executable"
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "$package is missing ($executable): run \`apt-get install $package\` as root" >&2
  exit 1
fi
apt() { DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 -qq "$@" >/dev/null 2>&1; }
if ! apt install -y --no-install-recommends "$package"; then
  apt update && apt install -y --no-install-recommends "$package" || {
    echo "installing $package failed: run \`apt-get install $package\` as root" >&2
    exit 1
  }
fi
[ -x "$executable" ] || { echo "$package installed but $executable is missing" >&2; exit 1; }
echo "$executable"
