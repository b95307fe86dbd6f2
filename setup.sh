#!/usr/bin/env bash
# Create .venv and install the pinned requirements (idempotent; torch comes from this machine's pip cache or PyPI).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
echo "setup: installing the pinned requirements into .venv (torch and monailabel: several minutes on a fresh machine)" >&2
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
echo "setup: done" >&2
