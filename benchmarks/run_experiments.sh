#!/usr/bin/env bash
# Reruns the paper's Table I comparison (python -m qunet experiment) with the app's CPU recipe on the stacks of
# sample-data/ (full masks in sample-data/ground-truth/); results go to docs/experiments/NAME.
# Usage: bash benchmarks/run_experiments.sh [NAME...]   NAME in: oct ct real (default: all)
# Every model trains with the app's recipe (about 4 minutes on 2 cores): about 3 hours per NAME at 3 seeds.
# On a GPU add --preset-like settings: --features 32,64,128,256,512,32 --patch-size 192 --seeds 20.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
run() {
    local name=$1; shift
    echo "== $name" >&2
    "$PY" -m qunet experiment --data sample-data --seeds 3 --sm-limit 3 --out "docs/experiments/$name" "$@"
}
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(oct ct real)
for name in "${names[@]}"; do
    case $name in
        oct) run oct --include 'oct*' --title "Synthetic OCT-like stacks (sample-data oct1, oct2)" ;;
        ct) run ct --include 'ct*' --title "Synthetic CT-like stacks (sample-data ct1, ct2)" ;;
        real) run real --include 'lung1*' 'brain1*' 'breast1*' \
                  --title "Real scans (sample-data lung1 CT, brain1 MRI, breast1 MRI)" ;;
        *) echo "unknown experiment $name" >&2; exit 2 ;;
    esac
done
