#!/usr/bin/env bash
# Reruns the learning curves whose results are in docs/learning-curve/ with the app's CPU recipe (about 4 to 5
# minutes per point on 2 cores: about 90 minutes in all; the ct curve has not been committed yet). On a GPU add --preset gpu (the paper-size setting).
# Usage: bash benchmarks/run_curves.sh [extra curve flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
run() {
    local name=$1; shift
    echo "== $name" >&2
    # the committed curves were measured with two patches in three centred on lesion, the recipe until 4 December
    "$PY" -m qunet curve --data sample-data --out "docs/learning-curve/$name" --foreground 0.66 "$@"
}
REAL=(--include 'lung1*' 'brain1*' 'breast1*')
run real-per-stack "${REAL[@]}" --counts 20 --per-stack --seeds 3 \
    --title "Real scans, 20 annotated slices in every stack" "${@}"
run real "${REAL[@]}" --counts 5 10 20 40 --seeds 2 --title "Real scans (sample-data lung1 CT, brain1 MRI, breast1 MRI)" "${@}"
run oct --include 'oct*' --counts 5 20 --seeds 2 --title "Synthetic OCT-like stacks (sample-data oct1, oct2)" "${@}"
run ct --include 'ct*' --counts 5 20 --seeds 2 --title "Synthetic CT-like stacks (sample-data ct1, ct2)" "${@}"
