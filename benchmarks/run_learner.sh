#!/usr/bin/env bash
# Reruns docs/learner.md's figures (about 40 minutes on 2 cores): settings chosen on sample-data's real stacks, then
# reported on confirmation-data's, which no setting was chosen on.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -m qunet learner --data sample-data --include 'lung1*' 'brain1*' 'breast1*' --seeds 2 --max-epochs 10 \
    --out docs/learner/choosing-500-updates.json
"$PY" -m qunet learner --data sample-data --include 'lung1*' 'brain1*' 'breast1*' --seeds 2 \
    --out docs/learner/choosing-400-updates.json
"$PY" -m qunet learner --data confirmation-data --seeds 2 --out docs/learner/confirmation.json
