#!/usr/bin/env bash
# Reruns the speed benchmark whose figures are in docs/benchmark/ (about 10 minutes on 2 cores).
# Run it on a quiet machine: the figures are ratios measured in one run, but other load still distorts them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -m qunet bench --out docs/benchmark/bench.json "$@" | tee docs/benchmark/bench.txt
