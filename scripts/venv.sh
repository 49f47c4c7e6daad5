#!/usr/bin/env bash
# Create or reuse the project-local .venv from the pinned requirements.lock.
# Re-installs only when requirements.lock (or a pyproject) changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp_src=$(cat requirements.lock pyproject.toml generated/python/pyproject.toml clients/python/pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ "$(cat .venv/.entrepot-stamp 2>/dev/null)" = "$stamp_src" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation \
  -e generated/python -e clients/python -e .
echo "$stamp_src" > .venv/.entrepot-stamp
