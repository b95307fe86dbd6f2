#!/usr/bin/env bash
# Reruns the large-cohort figures of docs/large-cohorts.md (about 20 minutes on 2 cores; run it on a quiet machine):
# records and policy over 1,000 / 10,000 / 100,000 volumes of synthetic records, scoring with 1 and 2 torchrun
# ranks, and a live server's Next sample and start-up over 1,000 and 10,000 scored volumes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p docs/large-cohorts
"$PY" -m qunet bench --only scale ranks --out docs/large-cohorts/bench.json | tee docs/large-cohorts/bench.txt
for n in 1000 10000; do
    "$PY" -m qunet bench --only next_sample --volumes "$n" --out "docs/large-cohorts/next_sample_$n.json" | tee "docs/large-cohorts/next_sample_$n.txt"
done
