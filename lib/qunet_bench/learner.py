"""How well the recipe learns one stack from a few annotated slices (`python -m qunet learner`).

    python -m qunet learner --data FOLDER [--include GLOB...] --seeds 3 --out FILE.json [recipe overrides]

Each stack is learned alone, as a user's first volume is: a fresh U-net++ is trained with the app's recipe on
`--annotated` ground-truth slices (every other lesion slice from the first, or with `--lesion-slices N` only the N
middle ones, then evenly spaced lesion-free slices), and evaluated with the app's inference on every other slice:
voxel Dice over all unannotated slices and over the unannotated lesion slices, as segmented and after each
post-processing (qunet.postprocess). Settings are chosen with this
command on some stacks and confirmed on others (docs/learner.md); the live loop (`python -m qunet loop`) then
measures what a user runs.
"""

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from qunet.config import ModelConfig, TrainConfig
from qunet.disagreement import segment
from qunet.network import build_network, prepare
from qunet.postprocess import MODES, postprocess
from qunet.training import seed_everything, train

from qunet_bench.cli import add_machine_arguments, machine, positive, recorded_command, share, widths
from qunet_bench.data import Case, find_pairs, load_cases, test_counts


def annotated_slices(case: Case, total: int, lesion_slices: int = 0) -> list[int]:
    """Every other lesion slice from the first (or the `lesion_slices` middle ones), filled up to `total` with
    evenly spaced lesion-free slices; at least one lesion slice is left unannotated when the stack has two."""
    lesion = case.lesion_slices
    if lesion_slices:
        middle = len(lesion) // 2
        chosen = lesion[max(0, middle - lesion_slices // 2) :][:lesion_slices]
    else:
        chosen = lesion[::2]
    if len(lesion) > 1 and len(chosen) == len(lesion):
        chosen = chosen[:-1]
    empty = [k for k in range(case.depth) if k not in set(lesion)]
    want = max(0, min(total - len(chosen), len(empty)))
    spaced = [empty[int(i)] for i in np.linspace(0, len(empty) - 1, want).round()] if want else []
    return sorted(set(chosen) | set(spaced))


def run(
    case: Case,
    seed: int,
    model: ModelConfig,
    settings: TrainConfig,
    total: int,
    lesion_slices: int,
    device: torch.device,
) -> dict:
    picks = annotated_slices(case, total, lesion_slices)
    seed_everything(seed)
    network = build_network(model.features, 1)
    start = time.perf_counter()
    train(network, case.slices(picks), settings, model.patch_size, seed=seed, device=device)
    seconds = time.perf_counter() - start
    found = segment(prepare(network, device), case.volume, model.patch_size, None, device)
    test = [k for k in range(case.depth) if k not in set(picks)]
    figures = {}
    for mode in MODES:  # every post-processing of the same segmentation
        kept = postprocess(found, mode) > 0
        figures[mode] = test_counts(kept[:, :, test], case.truth[:, :, test])[1]
    return {
        "stack": case.name,
        "seed": seed,
        "annotated": picks,
        "annotated_lesion": [k for k in picks if k in set(case.lesion_slices)],
        **figures["off"],
        "postprocessed": figures,
        "train_seconds": round(seconds, 1),
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="folder of stacks; full labels in DATA/ground-truth/")
    p.add_argument("--include", nargs="+", default=[], metavar="GLOB")
    p.add_argument("--seeds", type=positive, default=3)
    p.add_argument("--first-seed", type=int, default=0, help="seeds run from this one on")
    p.add_argument("--annotated", type=positive, default=15, help="annotated slices per stack")
    p.add_argument(
        "--lesion-slices",
        type=int,
        default=0,
        help="annotate only this many middle lesion slices (default: every other one)",
    )
    p.add_argument("--features", type=widths, help="override the app's widths")
    p.add_argument("--patch-size", type=positive)
    p.add_argument("--max-epochs", type=positive)
    p.add_argument("--steps-per-epoch", type=positive)
    p.add_argument("--batch-size", type=positive)
    p.add_argument("--foreground", type=share, help="share of patches centred on lesion")
    p.add_argument("--out", required=True, help="JSON file of every run and the settings")
    add_machine_arguments(p)


def main(args: argparse.Namespace) -> None:
    device = machine(args)
    model = replace(ModelConfig(), **{k: getattr(args, k) for k in ("features", "patch_size") if getattr(args, k)})
    settings = replace(
        TrainConfig(),
        **{
            k: getattr(args, k)
            for k in ("max_epochs", "steps_per_epoch", "batch_size", "foreground")
            if getattr(args, k) is not None
        },
    )
    runs = []
    for case in load_cases(find_pairs(args.data, include=args.include)):
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            runs.append(run(case, seed, model, settings, args.annotated, args.lesion_slices, device))
            r = runs[-1]
            largest = r["postprocessed"]["largest"]
            print(
                f"{case.name} seed {seed}: Dice {r['dice']:.3f}, lesion slices {r['dice_lesion_slices']:.3f}; "
                f"largest component {largest['dice']:.3f}, {largest['dice_lesion_slices']:.3f} "
                f"({len(r['annotated_lesion'])} of {len(r['annotated'])} annotated on lesion, "
                f"{r['train_seconds']:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"command": recorded_command("learner"), "model": asdict(model), "train": asdict(settings), "runs": runs},
            indent=1,
        )
    )
