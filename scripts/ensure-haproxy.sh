#!/usr/bin/env bash
# HAProxy from Debian for R10 (tests/reliability/test_rolling_restart.py): installed with
# apt-get when missing and we are root; otherwise one line saying what to install.
set -uo pipefail
have() { command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ]; }
have && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  log=$(mktemp)
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends haproxy >"$log" 2>&1 \
    || { apt-get update -q >>"$log" 2>&1 && apt-get install -y -q --no-install-recommends haproxy >>"$log" 2>&1; }
  have && { rm -f "$log"; exit 0; }
  echo "haproxy is missing and apt-get could not install it (see $log): apt-get install haproxy" >&2
  exit 1
fi
echo "haproxy is missing: apt-get install haproxy (as root)" >&2
exit 1
