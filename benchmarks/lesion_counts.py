"""How many of each method's training slices hold lesion, from an experiment's runs.csv and the ground truth.

    python benchmarks/lesion_counts.py docs/experiments/oct-sm3 --labels sample-data/ground-truth [--suffix .nii.gz]

(Experiments run after this script was written report the same count as the `#train with lesion` column.)
"""

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

from qunet.io import load_stack


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("experiment", help="folder with runs.csv")
    p.add_argument("--labels", required=True, help="folder of the ground-truth labels")
    p.add_argument("--name", default="{stack}.nii.gz", help="label file name pattern, e.g. {stack}.nrrd")
    args = p.parse_args()
    rows = [r for r in csv.DictReader(open(Path(args.experiment) / "runs.csv")) if r["stack"] != "all"]
    lesion = {}
    for stack in {r["stack"] for r in rows}:
        label = load_stack(Path(args.labels) / args.name.format(stack=stack)).array
        lesion[stack] = (label > 0).any(axis=(0, 1))
    per = defaultdict(lambda: defaultdict(int))
    for r in rows:
        slices = [int(k) for k in r["train_slices"].split()]
        per[r["method"]][r["seed"]] += int(np.sum(lesion[r["stack"]][slices])) if slices else 0
    print("| Method | training slices with lesion, per seed | mean |")
    print("|---|---|---|")
    for method, seeds in per.items():
        values = [seeds[s] for s in sorted(seeds)]
        print(f"| {method} | {', '.join(map(str, values))} | {np.mean(values):.1f} |")


if __name__ == "__main__":
    main()
