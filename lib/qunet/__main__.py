"""Command line: `python -m qunet {quality,generate,upload,experiment,curve,rounds,proxies,bench,rescore} ...` (see
README and docs/)."""

import argparse
import json
import sys
import time

from qunet.config import QualityConfig
from qunet.io import StackError, load_label, load_stack
from qunet.quality import slice_quality
from qunet.selection import select_initial


def cmd_quality(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    stack = load_stack(args.stack)
    roi = load_label(args.roi, stack) if args.roi else None
    settings = QualityConfig(
        median_window=args.median_window,
        blur_percentile=args.blur_percentile,
        psnr_percentile=args.psnr_percentile,
        epsilon0=args.epsilon0,
        max_initial=args.max_initial,
        min_initial=args.min_initial,
    )
    q = slice_quality(stack.array, roi, settings.median_window)
    initial = select_initial(q, settings)
    return {
        "stack": args.stack,
        "shape": list(stack.array.shape),
        "slice_axis": 2,
        **q.to_dict(),
        "initial": initial,
        "seconds": round(time.perf_counter() - start, 3),
    }


def cmd_generate(args: argparse.Namespace) -> dict:
    from qunet_bench.generate import write_cohort

    return write_cohort(
        args.out, args.cohort, args.kinds, args.count, args.seed, tuple(args.shape), args.source, args.stacks
    )


def cmd_upload(args: argparse.Namespace) -> dict:
    from qunet.dicomweb import upload

    return {"url": args.url, "series": upload(args.stacks, args.url, args.modality)}


def cmd_experiment(args: argparse.Namespace) -> None:
    from qunet_bench import table1_cli as experiment

    experiment.main(args)


def cmd_bench(args: argparse.Namespace) -> None:
    from qunet_bench import bench

    bench.main(args)


def cmd_curve(args: argparse.Namespace) -> None:
    from qunet_bench import curve

    curve.main(args)


def cmd_rounds(args: argparse.Namespace) -> None:
    from qunet_bench import rounds_cli

    rounds_cli.main(args)


def cmd_proxies(args: argparse.Namespace) -> None:
    from qunet_bench import proxies

    proxies.main(args)


def cmd_rescore(args: argparse.Namespace) -> None:
    from qunet_bench import rescore

    rescore.main(args)


def cmd_contention(args: argparse.Namespace) -> None:
    from qunet_bench import contention

    contention.main(args)


def cmd_learner(args: argparse.Namespace) -> None:
    from qunet_bench import learner

    learner.main(args)


def cmd_loop(args: argparse.Namespace) -> None:
    from qunet_bench import loop_bench

    loop_bench.main(args)


def parser() -> argparse.ArgumentParser:
    d = QualityConfig()
    p = argparse.ArgumentParser(prog="python -m qunet", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quality", help="per-slice quality metrics and the S0 pick of one stack, as JSON")
    q.add_argument("stack", help="NIfTI, NRRD, MetaImage (.mha) or DICOM series folder")
    q.add_argument("--roi", help="mask on the stack's grid (voxels > 0 form the ROI); default: automatic foreground")
    q.add_argument("--median-window", type=int, default=d.median_window)
    q.add_argument("--epsilon0", type=float, default=d.epsilon0)
    q.add_argument("--max-initial", type=int, default=d.max_initial)
    q.add_argument(
        "--min-initial", type=int, default=d.min_initial, help="S0 filled up to this many (0: cut-offs only)"
    )
    q.add_argument("--blur-percentile", type=float, default=d.blur_percentile, help="default: the stack's mean")
    q.add_argument("--psnr-percentile", type=float, default=d.psnr_percentile, help="default: the stack's mean")
    q.set_defaults(run=cmd_quality)
    g = sub.add_parser(
        "generate",
        help="write a cohort of stacks with lesion masks: synthetic OCT-like and CT-like "
        "(NIfTI), or real scans with inserted lesions (docs/cohorts.md)",
    )
    g.add_argument("out", help="folder; masks go to OUT/ground-truth/ with the same file names")
    g.add_argument(
        "--cohort",
        default="default",
        choices=["default", "prevalence", "hybrid"],
        help="default: lesions in one slab of 35-55%% of the slices; prevalence: 2-4 lesions of varied size "
        "and contrast in 5-30%% of the slices; hybrid: lesions inserted into the scans of --from",
    )
    g.add_argument("--kinds", nargs="+", default=["oct", "ct"], choices=["oct", "ct"], help="synthetic cohorts only")
    g.add_argument(
        "--count",
        type=int,
        default=2,
        help="stacks per kind (default, prevalence), or variants per source stack (hybrid)",
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=[128, 128, 32],
        metavar=("X", "Y", "Z"),
        help="synthetic cohorts only; hybrids keep their source's shape",
    )
    g.add_argument(
        "--from",
        dest="source",
        metavar="DIR",
        help="hybrid: folder of scans (NIfTI, NRRD, MetaImage) with same-named masks in DIR/ground-truth/",
    )
    g.add_argument(
        "--stacks",
        nargs="+",
        metavar="NAME",
        help="hybrid: only these stacks of DIR, by name without suffix (e.g. brain1 breast1 lung1)",
    )
    g.set_defaults(run=cmd_generate)
    u = sub.add_parser("upload", help="send stacks to a DICOMweb server as DICOM series (STOW-RS)")
    u.add_argument("url", help="DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web")
    u.add_argument("stacks", nargs="+", help="NIfTI, NRRD or MetaImage (.mha) files")
    u.add_argument("--modality", default="CT", help="DICOM modality (MONAI Label lists only CT unless told otherwise)")
    u.set_defaults(run=cmd_upload)
    from qunet_bench.bench import add_arguments as bench_arguments
    from qunet_bench.rescore import add_arguments as rescore_arguments
    from qunet_bench.table1_cli import add_arguments as experiment_arguments

    e = sub.add_parser("experiment", help="rerun the paper's Table I comparison on stacks with full labels (docs/)")
    experiment_arguments(e)
    e.set_defaults(run=cmd_experiment)
    from qunet_bench.curve import add_arguments as curve_arguments

    c = sub.add_parser("curve", help="learning curve: Dice on unseen slices against the number of annotated slices")
    curve_arguments(c)
    c.set_defaults(run=cmd_curve)
    from qunet_bench.rounds_cli import add_arguments as rounds_arguments

    r = sub.add_parser("rounds", help="multi-round active-learning benchmark of the app's loop against baselines")
    rounds_arguments(r)
    r.set_defaults(run=cmd_rounds)
    from qunet_bench.proxies import add_arguments as proxies_arguments

    x = sub.add_parser("proxies", help="which per-slice score of a model follows the slices it gets most wrong")
    proxies_arguments(x)
    x.set_defaults(run=cmd_proxies)
    b = sub.add_parser("bench", help="measure scoring, quality-metric and Next sample speed and scoring memory (docs/)")
    bench_arguments(b)
    b.set_defaults(run=cmd_bench)
    r = sub.add_parser("rescore", help="seconds from Train done to the first disagreement-phase Next sample (docs/)")
    rescore_arguments(r)
    r.set_defaults(run=cmd_rescore)
    from qunet_bench.contention import add_arguments as contention_arguments

    t = sub.add_parser("contention", help="Train and scoring times quiet and beside a busy process (docs/)")
    contention_arguments(t)
    t.set_defaults(run=cmd_contention)
    from qunet_bench.loop_bench import add_arguments as loop_arguments

    lo = sub.add_parser(
        "loop",
        help="the live loop at the app's defaults: the app's pick against random and evenly "
        "spaced slices, Dice after each Train (docs/)",
    )
    loop_arguments(lo)
    lo.set_defaults(run=cmd_loop)
    from qunet_bench.learner import add_arguments as learner_arguments

    le = sub.add_parser(
        "learner", help="Dice of a model trained on a few annotated slices of one stack, stack by stack (docs/)"
    )
    learner_arguments(le)
    le.set_defaults(run=cmd_learner)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        result = args.run(args)
    except (StackError, ValueError, ConnectionError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result is not None:  # experiment and bench print their own report
        json.dump(result, sys.stdout, indent=1)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
