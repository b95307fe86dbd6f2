"""Learning curve: voxel Dice on unseen slices against the number of annotated slices (`python -m qunet curve`).

    python -m qunet curve --data FOLDER [--include GLOB...] --counts 5 10 20 40 --seeds 3 --out DIR [--preset gpu]

For each count N and seed, N slices of the cohort are "annotated" (drawn at random, stratified: each stack in
proportion to its depth, its lesion slices in proportion; qunet_bench.data.stratified_draw), a fresh
U-net++ is trained on them with the app's recipe, and evaluated on every slice it did not see: voxel Dice over
all unseen slices (false positives on lesion-free slices count) and over the unseen slices holding lesion, per
stack and pooled, with the training time of each point.
"""

import argparse
import csv
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from qunet.config import GPU_MODEL, GPU_TRAIN, ModelConfig, TrainConfig
from qunet.network import build_network, prepare
from qunet.training import seed_everything, train

from qunet_bench.cli import add_machine_arguments, machine, positive, recorded_command, share, widths
from qunet_bench.data import Case, find_pairs, load_cases, stratified_draw, training_set
from qunet_bench.data import evaluate as evaluate_unseen

PRESETS = {"cpu": (ModelConfig(), TrainConfig()), "gpu": (GPU_MODEL, GPU_TRAIN)}


@dataclass
class Point:
    count: int
    seed: int
    picks: dict[str, list[int]]
    per_stack: dict[str, dict[str, float]]
    pooled: dict[str, float]
    train_seconds: float


def run_point(
    cases: list[Case],
    count: int,
    seed: int,
    model: ModelConfig,
    settings: TrainConfig,
    device: torch.device,
    per_stack: bool = False,
) -> Point:
    picks = stratified_draw(cases, count, np.random.default_rng([seed, count]), per_stack)
    seed_everything(seed)  # same seed, same initial weights at every count
    network = build_network(model.features, 1)
    start = time.perf_counter()
    train(network, training_set(cases, picks), settings, model.patch_size, seed=seed, device=device)
    seconds = time.perf_counter() - start
    result = evaluate_unseen(prepare(network, device), cases, picks, model.patch_size, device)
    return Point(count, seed, picks, result.per_stack, result.pooled, round(seconds, 1))


def _median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return float(np.median(values)) if values else float("nan")


def table(points: list[Point], cases: list[Case]) -> str:
    """Median over seeds (min-max in brackets) for each count: pooled, then each stack's lesion-slice Dice."""
    head = [
        "annotated",
        "train s",
        "Dice unseen",
        "Dice unseen lesion slices",
        *[f"{c.name}: lesion slices" for c in cases],
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for count in sorted({p.count for p in points}):
        runs = [p for p in points if p.count == count]

        def cell(values: list[float]) -> str:
            ok = [v for v in values if v == v]
            return f"{_median(ok):.2f} [{min(ok):.2f}-{max(ok):.2f}]" if ok else "–"

        row = [
            str(count),
            f"{_median([p.train_seconds for p in runs]):.0f}",
            cell([p.pooled["dice"] for p in runs]),
            cell([p.pooled["dice_lesion_slices"] for p in runs]),
        ]
        row += [
            cell([p.per_stack.get(c.name, {}).get("dice_lesion_slices", float("nan")) for p in runs]) for c in cases
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(points: list[Point], cases: list[Case], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted({p.count for p in points})
    fig, ax = plt.subplots(figsize=(7, 4.2))
    series = [
        ("pooled, all unseen slices", lambda p: p.pooled["dice"], "k", "-"),
        ("pooled, unseen lesion slices", lambda p: p.pooled["dice_lesion_slices"], "k", "--"),
    ]
    series += [
        (
            f"{c.name}, lesion slices",
            lambda p, n=c.name: p.per_stack.get(n, {}).get("dice_lesion_slices", float("nan")),
            None,
            ":",
        )
        for c in cases
    ]
    for label, value, color, style in series:
        ys = [_median([value(p) for p in points if p.count == n]) for n in counts]
        ax.plot(counts, ys, style, marker="o", color=color, label=label)
    ax.set_xscale("log")
    ax.set_xticks(counts, [str(n) for n in counts])
    ax.set_xticks([], minor=True)  # no minor labels such as 6x10^0 between the counts
    ax.set_xlabel("annotated slices (cohort)")
    ax.set_ylabel("voxel Dice on unseen slices (median over seeds)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(points: list[Point], cases: list[Case], out: Path, title: str, command: str, settings: dict) -> str:
    out.mkdir(parents=True, exist_ok=True)
    depth = {
        c.name: f"{c.volume.shape[0]}x{c.volume.shape[1]}x{c.depth}, lesion in {len(c.lesion_slices)}" for c in cases
    }
    text = "\n".join(
        [
            f"# {title}",
            "",
            f"Command: `{command}`",
            "",
            "Stacks: " + "; ".join(f"{n} ({d})" for n, d in depth.items()) + ".",
            "",
            f"Machine: {settings['device']}, torch {torch.__version__}. Settings: {settings['model']}; "
            f"{settings['train']}.",
            "",
            "Voxel Dice of a fresh model on the slices it was not trained on, median over seeds [min-max]; "
            "`train s`: training time of one point.",
            "",
            table(points, cases),
            "",
        ]
    )
    (out / "table.md").write_text(text)
    with open(out / "points.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "count",
                "seed",
                "stack",
                "dice",
                "dice_lesion_slices",
                "test_slices",
                "test_lesion_slices",
                "train_seconds",
                "annotated",
            ]
        )
        for p in points:
            for name, r in [("all", p.pooled), *p.per_stack.items()]:
                w.writerow(
                    [
                        p.count,
                        p.seed,
                        name,
                        round(r["dice"], 4),
                        round(r["dice_lesion_slices"], 4),
                        r.get("test_slices", ""),
                        r.get("test_lesion_slices", ""),
                        p.train_seconds,
                        " ".join(map(str, p.picks.get(name, []))),
                    ]
                )
    plot(points, cases, out / "curve.png", title)
    (out / "settings.json").write_text(json.dumps({"command": command, **settings}, indent=1))
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="folder of stacks; full labels in DATA/ground-truth/")
    p.add_argument("--include", nargs="+", default=[], metavar="GLOB")
    p.add_argument("--counts", type=positive, nargs="+", default=[5, 10, 20, 40], help="annotated slices per cohort")
    p.add_argument("--per-stack", action="store_true", help="counts are per stack (each leaving a slice unseen)")
    p.add_argument("--seeds", type=positive, default=3)
    p.add_argument(
        "--preset", choices=sorted(PRESETS), default="cpu", help="recipe size: cpu (minutes) or gpu (paper-size)"
    )
    p.add_argument("--features", type=widths, help="override the preset's widths")
    p.add_argument("--patch-size", type=positive)
    p.add_argument("--max-epochs", type=positive, help="override the preset's epochs (of steps-per-epoch updates)")
    p.add_argument("--steps-per-epoch", type=positive)
    p.add_argument("--batch-size", type=positive)
    p.add_argument("--foreground", type=share, help="share of patches centred on lesion")
    p.add_argument("--out", required=True)
    p.add_argument("--title", default="")
    add_machine_arguments(p)


def main(args: argparse.Namespace) -> None:
    device = machine(args)
    model, settings = PRESETS[args.preset]
    model = replace(model, **{k: getattr(args, k) for k in ("features", "patch_size") if getattr(args, k)})
    settings = replace(
        settings,
        **{
            k: getattr(args, k)
            for k in ("max_epochs", "steps_per_epoch", "batch_size", "foreground")
            if getattr(args, k) is not None
        },
    )
    cases = load_cases(find_pairs(args.data, include=args.include))
    points = []
    for count in args.counts:
        for seed in range(args.seeds):
            point = run_point(cases, count, seed, model, settings, device, args.per_stack)
            print(
                f"{count} slices, seed {seed}: Dice unseen {point.pooled['dice']:.3f}, lesion slices "
                f"{point.pooled['dice_lesion_slices']:.3f} ({point.train_seconds:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
            points.append(point)
    device_name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    )
    command = recorded_command("curve")
    title = args.title or f"Learning curve on {', '.join(c.name for c in cases)}"
    print(
        report(
            points,
            cases,
            Path(args.out),
            title,
            command,
            {"device": device_name, "model": asdict(model), "train": asdict(settings)},
        )
    )
