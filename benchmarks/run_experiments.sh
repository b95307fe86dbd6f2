#!/usr/bin/env bash
# Reruns every experiment whose results are in docs/experiments/ (CPU settings; about 10 minutes each on 2 cores).
# Usage: bash benchmarks/run_experiments.sh [NAME...]   NAME in: oct oct-sm3 ct-sm3 pyradiomics-sm3
#        oct-sm3-roi-label pyradiomics-sm3-roi-label (default: all)
# On a GPU, drop --threads and raise --image-size 256 --features 32,64,128,256,512,32 --epochs 60 --seeds 20.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
REAL=${REAL:-/work/shared/data/pyradiomics}  # brain1/breast1/lung1 _image.nrrd and _label.nrrd (pyradiomics test data)
COMMON=(--seeds 3 --image-size 64 --features 8,16,32,64,128,8 --epochs 15 --steps-per-epoch 5 --batch-size 8 --lr 1e-2 --threads 1)

run() {
    local name=$1; shift
    echo "== $name" >&2
    nice -n 10 "$PY" -m qunet experiment "$@" --out "docs/experiments/$name" "${COMMON[@]}"
}

names=("$@")
[ ${#names[@]} -eq 0 ] && names=(oct oct-sm3 ct-sm3 pyradiomics-sm3 oct-sm3-roi-label pyradiomics-sm3-roi-label)
for name in "${names[@]}"; do
    case $name in
        oct) run oct --data sample-data --include 'oct*' \
                 --title "Synthetic OCT-like stacks (sample-data oct1, oct2)" ;;
        oct-sm3) run oct-sm3 --data sample-data --include 'oct*' --sm-limit 3 \
                 --title "Synthetic OCT-like stacks (sample-data oct1, oct2), Sm capped at 3 per stack" ;;
        ct-sm3) run ct-sm3 --data sample-data --include 'ct*' --sm-limit 3 \
                 --title "Synthetic CT-like stacks (sample-data ct1, ct2), Sm capped at 3 per stack" ;;
        pyradiomics-sm3) run pyradiomics-sm3 --data "$REAL" --labels "$REAL" --include '*_image.nrrd' \
                 --label-replace _image _label --sm-limit 3 \
                 --title "Real pyradiomics stacks (brain1 MRI, breast1 MRI, lung1 CT), Sm capped at 3 per stack" ;;
        oct-sm3-roi-label) run oct-sm3-roi-label --data sample-data --include 'oct*' --sm-limit 3 --s0-roi label \
                 --title "Synthetic OCT-like stacks, Sm capped at 3, S0's CoV and mean inside the lesion mask (as the paper's code)" ;;
        pyradiomics-sm3-roi-label) run pyradiomics-sm3-roi-label --data "$REAL" --labels "$REAL" --include '*_image.nrrd' \
                 --label-replace _image _label --sm-limit 3 --s0-roi label \
                 --title "Real pyradiomics stacks, Sm capped at 3, S0's CoV and mean inside the lesion mask (as the paper's code)" ;;
        *) echo "unknown experiment $name" >&2; exit 2 ;;
    esac
done
