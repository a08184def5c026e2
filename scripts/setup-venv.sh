#!/usr/bin/env bash
# Creates/updates the controller venv (.venv). Idempotent: a no-op install when everything is present.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}   # the CPU wheel of this version lies on the dev/CI machines' disk
if [ ! -x "$VENV/bin/python" ]; then
  # Debian ships venv's ensurepip in a separate package: without it `python3 -m venv` leaves a venv with no pip.
  if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    echo "cannot create $VENV: python3 has no venv/ensurepip module. On Debian/Ubuntu run" \
         "\`apt-get install -y python3-venv\` (as root), then run make again." >&2
    exit 1
  fi
  python3 -m venv "$VENV"
elif [ ! -x "$VENV/bin/pip" ]; then
  echo "$VENV has no pip (made before python3-venv was installed?): remove it (rm -rf $VENV) and run make again." >&2
  exit 1
fi
stamp="$VENV/.pyckpt-installed"
want=$(cat requirements.txt requirements-dev.txt pyproject.toml | sha256sum | cut -c1-16)-$TORCH_VERSION
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing torch==$TORCH_VERSION, requirements-dev.txt and pyckpt into $VENV ..."
  if ! "$VENV/bin/pip" install --disable-pip-version-check "torch==$TORCH_VERSION" -r requirements-dev.txt -e . \
      > "$VENV/pip-install.log" 2>&1; then
    grep -v "^WARNING: Location" "$VENV/pip-install.log" | tail -40
    echo "pip install failed; full log: $VENV/pip-install.log" >&2
    exit 1
  fi
  "$VENV/bin/python" -c "import torch, pyckpt"
  echo "$want" > "$stamp"
fi
