#!/usr/bin/env bash
# Creates .venv (Python 3.11+) and installs lmlab with the extras given as arguments, e.g. `test,parity`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "lmlab needs Python 3.11 or newer")'
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
extras=${1:-}
.venv/bin/python -m pip install --quiet -e ".${extras:+[$extras]}"
