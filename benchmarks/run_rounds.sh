#!/usr/bin/env bash
# The multi-round active-learning benchmark on every cohort (python -m qunet rounds), results in docs/rounds/NAME.
# Each round trains a model with the app's recipe: about 4 minutes on 2 CPU cores, so hours per cohort; a GPU
# run is the practical one. Usage: bash benchmarks/run_rounds.sh [extra rounds flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORK=${WORK:-$(mktemp -d)}
"$PY" -m qunet generate "$WORK/prevalence" --cohort prevalence --count 5 --seed 1
"$PY" -m qunet generate "$WORK/hybrid" --cohort hybrid --from sample-data --stacks brain1 breast1 lung1 --count 4 --seed 1
run() {
    local name=$1; shift
    echo "== $name" >&2
    "$PY" -m qunet rounds --out "docs/rounds/$name" --rounds 4 --per-round 12 --seeds 5 "$@"
}
run oct --data sample-data --include 'oct*' "${@}"
run ct --data sample-data --include 'ct*' "${@}"
run real --data sample-data --include 'lung1*' 'brain1*' 'breast1*' "${@}"
run prevalence --data "$WORK/prevalence" "${@}"
run hybrid --data "$WORK/hybrid" "${@}"
