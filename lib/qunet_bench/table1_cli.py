"""`python -m qunet experiment`: the Table I experiment's command line; the experiment itself is
qunet_bench.table1.

    python -m qunet experiment --data FOLDER [--labels DIR] --out DIR [settings]
"""

import argparse
from dataclasses import replace

from qunet.config import TrainConfig

from qunet_bench.cli import add_machine_arguments, machine, positive, recorded_command, widths
from qunet_bench.data import find_pairs
from qunet_bench.table1 import METHODS, ExperimentConfig, run_experiment


def add_arguments(p: argparse.ArgumentParser) -> None:
    d, t = ExperimentConfig(), TrainConfig()
    p.add_argument("--data", required=True, help="folder of stacks with full labels")
    p.add_argument("--labels", help="folder of labels with the images' file names (default DATA/ground-truth)")
    p.add_argument("--include", nargs="+", default=[], metavar="GLOB", help="only images whose file name matches")
    p.add_argument(
        "--label-replace",
        nargs=2,
        metavar=("OLD", "NEW"),
        help="label file name = image file name with OLD replaced by NEW (e.g. _image _label)",
    )
    p.add_argument("--out", default="experiment-results", help="folder for table.md/.csv, runs.csv, the plot")
    p.add_argument("--title", default="")
    p.add_argument("--seeds", type=positive, default=d.seeds, help="repetitions (the paper: 20)")
    p.add_argument("--first-seed", type=int, default=d.first_seed)
    p.add_argument("--patch-size", type=positive, default=d.patch_size)
    p.add_argument("--features", type=widths, default=d.features, help="six comma-separated widths")
    p.add_argument("--max-epochs", type=positive, default=t.max_epochs, help="epochs per training stage")
    p.add_argument("--steps-per-epoch", type=positive, default=t.steps_per_epoch)
    p.add_argument("--batch-size", type=positive, default=t.batch_size)
    p.add_argument("--lr", type=float, default=t.learning_rate)
    p.add_argument("--random-fraction", type=float, default=d.random_fraction)
    p.add_argument(
        "--extra-fractions",
        type=float,
        nargs="*",
        default=list(d.extra_fractions),
        help="more random U-net++ points for the plot, e.g. 0.1 0.5",
    )
    p.add_argument("--q0", type=float, default=d.q0)
    p.add_argument("--sm-limit", type=positive, default=d.sm_limit, help="cap on Sm per stack (default: none)")
    p.add_argument("--max-initial", type=positive, default=d.max_initial, help="cap on S0 per stack")
    p.add_argument(
        "--min-initial", type=int, default=d.min_initial, help="S0 filled up to this many (0: cut-offs only)"
    )
    p.add_argument("--epsilon0", type=float, default=d.epsilon0)
    p.add_argument("--blur-percentile", type=float, default=d.blur_percentile, help="S0 cut-off (default: the mean)")
    p.add_argument("--psnr-percentile", type=float, default=d.psnr_percentile, help="S0 cut-off (default: the mean)")
    p.add_argument(
        "--s0-roi",
        choices=("auto", "label"),
        default=d.s0_roi,
        help="ROI for S0's CoV and mean: the app's automatic foreground, or the ground truth (paper's notebook)",
    )
    p.add_argument("--mc-passes", type=positive, default=d.mc_passes)
    p.add_argument("--mc-dropout", type=float, default=d.mc_dropout)
    p.add_argument("--mc-score", choices=("entropy", "variance"), default=d.mc_score)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(d.methods))
    add_machine_arguments(p)
    p.add_argument("--no-progress", action="store_true")


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    settings = replace(
        TrainConfig(),
        max_epochs=args.max_epochs,
        steps_per_epoch=args.steps_per_epoch,
        batch_size=args.batch_size,
        learning_rate=args.lr,
    )
    return ExperimentConfig(
        seeds=args.seeds,
        first_seed=args.first_seed,
        patch_size=args.patch_size,
        features=tuple(args.features),
        train=settings,
        random_fraction=args.random_fraction,
        extra_fractions=tuple(args.extra_fractions),
        q0=args.q0,
        sm_limit=args.sm_limit,
        max_initial=args.max_initial,
        min_initial=args.min_initial,
        epsilon0=args.epsilon0,
        blur_percentile=args.blur_percentile,
        psnr_percentile=args.psnr_percentile,
        s0_roi=args.s0_roi,
        mc_passes=args.mc_passes,
        mc_dropout=args.mc_dropout,
        mc_score=args.mc_score,
        methods=tuple(args.methods),
        device=args.device,
    )


def main(args: argparse.Namespace) -> None:
    machine(args)  # --threads; the experiment takes the device by name (ExperimentConfig.device)
    pairs = find_pairs(args.data, args.labels, args.include, tuple(args.label_replace) if args.label_replace else None)
    command = recorded_command("experiment")
    result = run_experiment(pairs, config_from_args(args), args.out, args.title, command, not args.no_progress)
    print(result["table"])
    print("written: " + ", ".join(result["files"]))
