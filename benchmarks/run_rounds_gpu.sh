#!/usr/bin/env bash
# The multi-round benchmark (python -m qunet rounds) on one CUDA GPU, with twice the training per round of
# run_rounds.sh's CPU runs: 200 updates (the rounds default of 4 epochs, at the app's 50 updates per epoch; the app
# itself trains 10 epochs: add --max-epochs 10), the same rounds and slices per round, 10 seeds. The small model
# leaves a GPU mostly idle, so every (cohort, method) runs as a process of its own beside the others, into PARTS; each
# cohort's parts are then merged into docs/rounds/gpu-NAME on the seeds every method finished (rerunning adds only
# the missing seeds to each part). On an H200 with 16 cores the 15 processes took about 37 s per round each, the GPU
# about 97 % busy: 4 seeds in 8.5 minutes (3 on the real stacks and the hybrid cohort); a second session resuming
# the parts reached 8 seeds (6) in another 8.4 minutes.
# Usage: [PARTS=DIR] [COHORTS="oct ct ..."] [METHODS="lesion random"] [SEEDS=10] bash benchmarks/run_rounds_gpu.sh
#        [extra flags...]; MERGE=0 runs the parts and leaves the merge (e.g. to merge on another machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORK=${WORK:-$(mktemp -d)}
PARTS=${PARTS:-$WORK/parts}
read -r -a COHORTS <<< "${COHORTS:-oct ct real hybrid prevalence}"
read -r -a METHODS <<< "${METHODS:-lesion random interval}"
SETTINGS=(--rounds 3 --seeds "${SEEDS:-10}" --foreground 0.33 --threads 1)
[ -d "$WORK/prevalence" ] || "$PY" -m qunet generate "$WORK/prevalence" --cohort prevalence --kinds oct ct --count 3 --seed 1
[ -d "$WORK/hybrid" ] || "$PY" -m qunet generate "$WORK/hybrid" --cohort hybrid --from sample-data --stacks brain1 breast1 \
    --count 5 --seed 1
cohort() {  # the data and slices per round of a cohort, as run_rounds.sh gives them
    case $1 in
        oct) ARGS=(--data sample-data --include 'oct*' --per-round 4) ;;
        ct) ARGS=(--data sample-data --include 'ct*' --per-round 4) ;;
        real) ARGS=(--data sample-data --include 'lung1*' 'brain1*' 'breast1*' --per-round 4) ;;
        hybrid) ARGS=(--data "$WORK/hybrid" --per-round 8) ;;
        prevalence) ARGS=(--data "$WORK/prevalence" --per-round 8) ;;
        *) echo "unknown cohort $1" >&2; exit 2 ;;
    esac
}
mkdir -p "$PARTS"
for name in "${COHORTS[@]}"; do
    cohort "$name"
    for method in "${METHODS[@]}"; do
        "$PY" -m qunet rounds "${ARGS[@]}" "${SETTINGS[@]}" --methods "$method" --out "$PARTS/$name-$method" "$@" \
            > "$PARTS/$name-$method.log" 2>&1 &
    done
done
failed=0
while true; do  # every process, even after one fails
    wait -n || { s=$?; [ "$s" = 127 ] && break; failed=1; }
done
[ "$failed" = 0 ] || echo "a part failed: see $PARTS/*.log" >&2
[ "${MERGE:-1}" = 1 ] || exit "$failed"
for name in "${COHORTS[@]}"; do
    cohort "$name"
    parts=()
    for method in "${METHODS[@]}"; do parts+=("$PARTS/$name-$method"); done
    "$PY" -m qunet rounds "${ARGS[@]}" "${SETTINGS[@]}" --methods "${METHODS[@]}" --merge "${parts[@]}" \
        --out "docs/rounds/gpu-$name" --title "$name: 200 updates per round, on a GPU" "$@"
done
exit "$failed"
