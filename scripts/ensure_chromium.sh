#!/usr/bin/env bash
# Headless Chromium for the browser test (tests/e2e/test_bff_browser.py): Debian's
# `chromium` package, driven by playwright-core (Playwright's own browser download is
# not used). Installs it with apt-get when missing and we are root; otherwise says in
# one line what to install. Prints the browser's path.
set -euo pipefail
BROWSER=${CHROMIUM_PATH:-/usr/bin/chromium}
if [ -x "$BROWSER" ]; then
  echo "$BROWSER"
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "chromium is missing at $BROWSER: run \`apt-get install chromium\` as root (or set CHROMIUM_PATH)" >&2
  exit 1
fi
apt() { DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 -qq "$@" >/dev/null; }
# The package lists may be missing or stale on a fresh machine: update once and retry.
if ! apt install -y --no-install-recommends chromium 2>/dev/null; then
  apt update && apt install -y --no-install-recommends chromium || {
    echo "installing chromium failed: run \`apt-get install chromium\` as root" >&2
    exit 1
  }
fi
[ -x "$BROWSER" ] || { echo "chromium installed but $BROWSER is missing: set CHROMIUM_PATH" >&2; exit 1; }
echo "$BROWSER"
