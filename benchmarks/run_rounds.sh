#!/usr/bin/env bash
# Reruns the multi-round benchmark (python -m qunet rounds) whose results are in docs/rounds/NAME: 3 rounds with a
# fifth of the app's training per round (--steps-per-epoch 25), 5 seeds; about 45-85 s per round on 2 CPU cores
# (MC dropout about 90-120 s, 420 s on the hybrid cohort and 320 s on the real stacks: five scoring passes), about
# 20 hours in all. A folder that already holds results of the same settings adds only the (method, seed) pairs it
# lacks: delete docs/rounds/NAME to rerun it from scratch.
# The same rounds with twice the training per round (200 updates) on a GPU, into docs/rounds/gpu-NAME:
# benchmarks/run_rounds_gpu.sh.
# Usage: bash benchmarks/run_rounds.sh [extra flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORK=${WORK:-$(mktemp -d)}
"$PY" -m qunet generate "$WORK/prevalence" --cohort prevalence --kinds oct ct --count 3 --seed 1
"$PY" -m qunet generate "$WORK/hybrid" --cohort hybrid --from sample-data --stacks brain1 breast1 --count 5 --seed 1
METHODS=(lesion random interval)
prefix=docs/rounds/
run() {
    local name=$1 per_round=$2; shift 2
    echo "== $name" >&2
    # --foreground 0.66: the recipe's share of lesion-centred patches until 4 December, with which the folders were
    # made; the runs at 0.33 (the recipe since) pass --foreground 0.33, which overrides it
    "$PY" -m qunet rounds --out "$prefix$name" --rounds 3 --per-round "$per_round" --seeds 5 \
        --steps-per-epoch 25 --foreground 0.66 "$@"
}
run ct-5seeds 4 --data sample-data --include 'ct*' --methods "${METHODS[@]}" paper mcdropout "${@}"
run oct 4 --data sample-data --include 'oct*' --methods "${METHODS[@]}" "${@}"
# every method from scratch in one go, on one machine (resumed folders pair runs of different machines: docs/README.md)
run oct-mc 4 --data sample-data --include 'oct*' --methods "${METHODS[@]}" mcdropout lesion-random "${@}"
run real 4 --data sample-data --include 'lung1*' 'brain1*' 'breast1*' --methods "${METHODS[@]}" "${@}"
run real-middles 4 --data sample-data --include 'lung1*' 'brain1*' 'breast1*' --methods middles "${METHODS[@]}" "${@}"
run prevalence 8 --data "$WORK/prevalence" --methods "${METHODS[@]}" "${@}"
run hybrid 8 --data "$WORK/hybrid" --methods "${METHODS[@]}" "${@}"
# middles against the others: CT-like from scratch in one run; elsewhere added to copies of the folders above
run ct-middles 4 --data sample-data --include 'ct*' --methods middles "${METHODS[@]}" "${@}"
for name in oct-mc:oct-middles prevalence:prevalence-middles hybrid:hybrid-middles; do
    [ -e "$prefix${name#*:}" ] || cp -r "$prefix${name%%:*}" "$prefix${name#*:}"
done
run oct-middles 4 --data sample-data --include 'oct*' --methods middles "${@}"
run prevalence-middles 8 --data "$WORK/prevalence" --methods middles "${@}"
run hybrid-middles 8 --data "$WORK/hybrid" --methods middles "${@}"
# lesion's picks trained also on pseudo-labelled neighbours of the annotated lesion slices, added to copies
for name in ct-middles:ct-neighbours oct-middles:oct-neighbours real-middles:real-neighbours; do
    [ -e "$prefix${name#*:}" ] || cp -r "$prefix${name%%:*}" "$prefix${name#*:}"
done
run ct-neighbours 4 --data sample-data --include 'ct*' --methods lesion+copy lesion+model "${@}"
run oct-neighbours 4 --data sample-data --include 'oct*' --methods lesion+copy lesion+model "${@}"
run real-neighbours 4 --data sample-data --include 'lung1*' 'brain1*' 'breast1*' --methods lesion+copy "${@}"
# added to the middles folders after the copies above: MC dropout on the hybrid cohort (3 seeds: about 7 min per
# round, five scoring passes over 230 slices) and the paper's pick on the hybrid and real cohorts
run hybrid-middles 8 --data "$WORK/hybrid" --methods mcdropout --seeds 3 "${@}"
run hybrid-middles 8 --data "$WORK/hybrid" --methods paper "${@}"
run real-middles 4 --data sample-data --include 'lung1*' 'brain1*' 'breast1*' --methods paper "${@}"
# lesion-aware random (reads the truth) on the prevalence, real and hybrid cohorts; the paper's pick on the
# prevalence cohort and on all 5 seeds of the OCT-like stacks (added to oct-mc after its copy into oct-middles)
run prevalence-middles 8 --data "$WORK/prevalence" --methods lesion-random paper "${@}"
run real-middles 4 --data sample-data --include 'lung1*' 'brain1*' 'breast1*' --methods lesion-random "${@}"
run hybrid-middles 8 --data "$WORK/hybrid" --methods lesion-random "${@}"
run oct-mc 4 --data sample-data --include 'oct*' --methods paper "${@}"
# seeds 5-9 of lesion, random and fixed interval on the OCT-like, CT-like and real stacks and the hybrid and
# prevalence cohorts, added to copies of the one-run and middles folders
ten_seeds() {
    local from=$1 name=$2 per_round=$3; shift 3
    [ -e "$prefix$name" ] || cp -r "$prefix$from" "$prefix$name"
    run "$name" "$per_round" --methods "${METHODS[@]}" --seeds 10 "$@"
}
ten_seeds oct-mc oct-10seeds 4 --data sample-data --include 'oct*' "${@}"
ten_seeds ct-middles ct-10seeds 4 --data sample-data --include 'ct*' "${@}"
ten_seeds hybrid-middles hybrid-10seeds 8 --data "$WORK/hybrid" "${@}"
ten_seeds real-middles real-10seeds 4 --data sample-data --include 'lung1*' 'brain1*' 'breast1*' "${@}"
ten_seeds prevalence-middles prevalence-10seeds 8 --data "$WORK/prevalence" "${@}"
# MC dropout on the real stacks (seeds 0-4, about 5 min per round there), paired with the 10-seed folder's seeds
run real-10seeds 4 --data sample-data --include 'lung1*' 'brain1*' 'breast1*' --methods mcdropout "${@}"
# MC dropout on the prevalence cohort (seeds 0-4, about 95 s per round), paired with the 10-seed folder's seeds
run prevalence-10seeds 8 --data "$WORK/prevalence" --methods mcdropout "${@}"
# MC dropout's seeds 3-4 on the hybrid cohort (about 6 min per round), beside the seeds 0-2 copied from hybrid-middles
run hybrid-10seeds 8 --data "$WORK/hybrid" --methods mcdropout "${@}"
# seeds 10-14 of lesion, random and fixed interval on the hybrid cohort, added to a copy of hybrid-10seeds
[ -e "${prefix}hybrid-15seeds" ] || cp -r "${prefix}hybrid-10seeds" "${prefix}hybrid-15seeds"
run hybrid-15seeds 8 --data "$WORK/hybrid" --methods "${METHODS[@]}" --seeds 15 "${@}"
# lesion-aware random (reads the truth) on the CT-like stacks, 10 seeds: how much a truth-aware pick gains there
run ct-10seeds 4 --data sample-data --include 'ct*' --methods lesion-random --seeds 10 "${@}"
# `interior` (lesion with each stack's end slices last) and `appearance` (k-centre over slice thumbnails): 10
# seeds on the CT-like stacks, 5 on the hybrid cohort
run ct-10seeds 4 --data sample-data --include 'ct*' --methods interior appearance --seeds 10 "${@}"
run hybrid-15seeds 8 --data "$WORK/hybrid" --methods appearance --seeds 5 "${@}"
# `interior` on the OCT-like stacks, the hybrid cohort and the real stacks, 5 seeds
run oct-10seeds 4 --data sample-data --include 'oct*' --methods interior --seeds 5 "${@}"
run hybrid-15seeds 8 --data "$WORK/hybrid" --methods interior --seeds 5 "${@}"
run real-10seeds 4 --data sample-data --include 'lung1*' 'brain1*' 'breast1*' --methods interior --seeds 5 "${@}"
# one training patch in three centred on lesion (--foreground 0.33, the recipe since 4 December) on every cohort
REAL=(--data sample-data --include 'lung1*' 'brain1*' 'breast1*')
run ct-foreground33 4 --data sample-data --include 'ct*' --methods lesion random --seeds 10 --foreground 0.33 "${@}"
run real-foreground33 4 "${REAL[@]}" --methods lesion --seeds 10 --foreground 0.33 "${@}"
# (seeds 0-4, then seeds 5-9 added in a later run with --seeds 10)
run oct-foreground33 4 --data sample-data --include 'oct*' --methods "${METHODS[@]}" --foreground 0.33 --seeds 10 "${@}"
run hybrid-foreground33 8 --data "$WORK/hybrid" --methods "${METHODS[@]}" --foreground 0.33 --seeds 10 "${@}"
run prevalence-foreground33 8 --data "$WORK/prevalence" --methods "${METHODS[@]}" --foreground 0.33 --seeds 10 "${@}"
run ct-foreground33 4 --data sample-data --include 'ct*' --methods interval --seeds 10 --foreground 0.33 "${@}"
# MC dropout at 0.33 on the OCT-like stacks, seeds 0-4
run oct-foreground33 4 --data sample-data --include 'oct*' --methods mcdropout --foreground 0.33 "${@}"
# and on the CT-like stacks and the prevalence cohort (a second 4 December session), the real stacks (a third; about
# 4 minutes a round on 2 cores: five scoring passes over 512 px slices); the hybrid cohort's: not run
run ct-foreground33 4 --data sample-data --include 'ct*' --methods mcdropout --foreground 0.33 "${@}"
run prevalence-foreground33 8 --data "$WORK/prevalence" --methods mcdropout --foreground 0.33 "${@}"
run real-foreground33 4 "${REAL[@]}" --methods mcdropout --foreground 0.33 "${@}"
# `interior` at 0.33 on the CT-like stacks (third session)
run ct-foreground33 4 --data sample-data --include 'ct*' --methods interior --seeds 10 --foreground 0.33 "${@}"
# random and fixed interval on the real stacks: seeds 0-4 first, 5-9 added after seeing them (docs/README.md)
run real-foreground33 4 "${REAL[@]}" --methods random interval --seeds 10 --foreground 0.33 "${@}"
# random slices up to 25 % of the OCT-like and CT-like slices (16 of 64): the 12 % target
"$PY" -m qunet rounds --data sample-data --include 'oct*' --rounds 4 --per-round 4 --seeds 5 --steps-per-epoch 25 \
    --methods random --foreground 0.66 --out docs/rounds/oct-random-4rounds "${@}"
"$PY" -m qunet rounds --data sample-data --include 'ct*' --rounds 4 --per-round 4 --seeds 10 --steps-per-epoch 25 \
    --methods random --foreground 0.66 --out docs/rounds/ct-random-4rounds "${@}"
# the same at 0.33, and to about 25 % of the prevalence (48 of 192), real (24 of 94) and hybrid (56 of 230) cohorts'
# slices (4 December; other machines than the 3-round 0.33 runs' seeds 0-4, which they do not repeat exactly).
# Each line: name, rounds, slices per round, seeds, data
for cohort in "oct 4 4 5 --data sample-data --include oct*" "ct 4 4 10 --data sample-data --include ct*" \
        "prevalence 6 8 5 --data $WORK/prevalence" "real 6 4 5 ${REAL[*]}" "hybrid 7 8 5 --data $WORK/hybrid"; do
    read -r name rounds per_round seeds data <<< "$cohort"
    read -r -a data <<< "$data"
    "$PY" -m qunet rounds "${data[@]}" --rounds "$rounds" --per-round "$per_round" --seeds "$seeds" --steps-per-epoch 25 \
        --methods random --foreground 0.33 --out "docs/rounds/$name-random-${rounds}rounds-foreground33" "${@}"
done
for kind in ct oct; do  # which per-slice score follows the model's errors
    "$PY" -m qunet proxies --data sample-data --include "$kind*" --steps-per-epoch 25 --foreground 0.66 \
        --out "docs/rounds/proxies-$kind"
done
