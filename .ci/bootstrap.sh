#!/usr/bin/env bash
# One-time set-up of a machine for kfac-tune: system packages (offline data, a browser for the UI test,
# PostgreSQL for the multi-worker test) and a virtual environment with the project installed.
# Idempotent: a second run only checks. Used by `make demo`, `make test` and CI.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${KFAC_TUNE_VENV:-.venv}
APT_PACKAGES="dataset-fashion-mnist chromium postgresql"

missing=""
for pkg in $APT_PACKAGES; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "bootstrap: installing system packages:$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends $missing >/dev/null
  else
    echo "bootstrap: not root, skipping system packages:$missing (the tests that need them will skip)" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import kfac_tune, torch, optuna, mlflow" 2>/dev/null; then
  echo "bootstrap: creating $VENV (torch, torchvision, optuna, mlflow, ...; a few minutes the first time)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null
  # torch first and pinned: the machine's pip constraints point at local wheels of these exact versions.
  "$VENV/bin/pip" install -q "torch==2.14.1" "torchvision==0.29.1"
  "$VENV/bin/pip" install -q -e ".[test,postgres]"
fi
echo "bootstrap: ready ($VENV)"
