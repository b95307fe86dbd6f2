#!/usr/bin/env bash
# Reruns docs/loop.md's live loop on confirmation-data at the app's defaults (about 30 minutes per seed on 2 cores;
# the documented run has one seed: add --seeds 3 for the issue's three).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -m qunet loop --studies confirmation-data --seeds 1 --rounds 3 --per-round 4 \
    --out docs/loop/confirmation-seed0.json "$@"
