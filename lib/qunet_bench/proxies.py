"""Which per-slice score of a model points at the slices it gets most wrong (`python -m qunet proxies`).

    python -m qunet proxies --data FOLDER [--include GLOB...] --rounds 2 --per-round 4 --seeds 2 --out DIR

The loop of the multi-round benchmark with random slices (the same seeds and training): after each round's
training, every open slice gets each candidate score and its error (level-4 voxels wrong against the ground
truth: false positives plus false negatives). Reported per seed and round: Spearman's rank correlation of each
score with the error, and how many of the score's top `per-round` slices hold lesion. A pick should rank slices
by a score that follows the error; the paper's Q ranks the lowest first.
"""

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from qunet.disagreement import jaccard, levels_3_and_4

from qunet_bench.activelearning import Benchmark, LoopRun, RoundsConfig
from qunet_bench.cli import add_machine_arguments, machine, positive, recorded_command, share, widths
from qunet_bench.data import find_pairs, load_cases

# name -> per-slice score from (level-3 logits, level-4 logits), higher = asked for first
SCORES = {
    "low Q (paper)": lambda l3, l4: -jaccard(l3 > 0, l4 > 0),
    "L3/L4 disagreeing pixels": lambda l3, l4: ((l3 > 0) ^ (l4 > 0)).flatten(1).sum(1).double(),
    "predicted lesion pixels": lambda l3, l4: (l4 > 0).flatten(1).sum(1).double(),
    "level-4 entropy": lambda l3, l4: _entropy(torch.sigmoid(l4)).flatten(1).sum(1).double(),
}


def _entropy(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return -(p * p.log() + (1 - p) * (1 - p).log())


@torch.inference_mode()
def slice_rows(network: torch.nn.Module, run: LoopRun, patch_size: int, device: torch.device) -> list[dict]:
    """Each open slice's scores, error and whether it holds lesion (one-label models)."""
    rows = []
    for case in run.cases:
        todo = [k for k in range(case.depth) if k not in run.annotated[case.name]]
        for chunk, l3, l4 in levels_3_and_4(network, case.volume, patch_size, todo, device):
            l3, l4 = l3[:, 0], l4[:, 0]
            scores = {name: f(l3, l4).cpu().numpy() for name, f in SCORES.items()}
            truth = torch.from_numpy(np.moveaxis(case.truth[:, :, chunk], 2, 0)).to(device)
            error = ((l4 > 0) ^ truth).flatten(1).sum(1).cpu().numpy()
            for i, k in enumerate(chunk):
                rows.append(
                    {
                        "slice": (case.name, k),
                        "error": int(error[i]),
                        "lesion": bool(case.truth[:, :, k].any()),
                        **{name: float(s[i]) for name, s in scores.items()},
                    }
                )
    return rows


def summary(rows: list[dict], top: int) -> dict[str, dict[str, float]]:
    error = [r["error"] for r in rows]
    out = {}
    for name in SCORES:
        values = np.array([r[name] for r in rows])
        best = np.argsort(-values, kind="stable")[:top]
        out[name] = {
            "spearman": round(float(spearmanr(values, error).correlation), 2),
            "lesion_in_top": int(sum(rows[i]["lesion"] for i in best)),
        }
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="folder of stacks; full labels in DATA/ground-truth/")
    p.add_argument("--include", nargs="+", default=[], metavar="GLOB")
    p.add_argument("--rounds", type=positive, default=2)
    p.add_argument("--per-round", type=positive, default=4)
    p.add_argument("--seeds", type=positive, default=2)
    p.add_argument("--steps-per-epoch", type=positive, default=RoundsConfig().train.steps_per_epoch)
    p.add_argument(
        "--foreground",
        type=share,
        default=RoundsConfig().train.foreground,
        help="share of training patches centred on an annotated lesion pixel",
    )
    p.add_argument("--features", type=widths, default=RoundsConfig().model.features)
    p.add_argument("--patch-size", type=positive, default=RoundsConfig().model.patch_size)
    p.add_argument("--out", required=True)
    add_machine_arguments(p)


def main(args: argparse.Namespace) -> None:
    d = RoundsConfig()
    config = replace(
        d,
        rounds=args.rounds,
        per_round=args.per_round,
        train=replace(d.train, steps_per_epoch=args.steps_per_epoch, foreground=args.foreground),
        model=replace(d.model, features=args.features, patch_size=args.patch_size),
    )
    device = machine(args)
    cases = load_cases(find_pairs(args.data, include=args.include))
    bench = Benchmark(cases, config, device)
    results = []
    for seed in range(args.seeds):
        for run, r, _, _, _ in bench.loop("random", seed):  # the random method of `python -m qunet rounds`
            rows = slice_rows(run.network, run, config.model.patch_size, device)
            results.append(
                {
                    "seed": seed,
                    "round": r + 1,
                    "open": len(rows),
                    "lesion": sum(x["lesion"] for x in rows),
                    "scores": summary(rows, args.per_round),
                }
            )
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    lines = ["| seed | round | " + " | ".join(SCORES) + " |", "|---|---|" + "---|" * len(SCORES)]
    for res in results:
        lines.append(
            f"| {res['seed']} | {res['round']} | "
            + " | ".join(
                f"{s['spearman']:+.2f} ({s['lesion_in_top']} of {args.per_round})" for s in res["scores"].values()
            )
            + " |"
        )
    table = "\n".join(lines)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = recorded_command("proxies")
    saved = {"command": command, "train": asdict(config.train), "model": asdict(config.model), "results": results}
    (out / "proxies.json").write_text(json.dumps(saved, indent=1, default=str))
    (out / "table.md").write_text(
        f"Command: `{command}`\n\nSpearman's rho of each score with the slice's error "
        f"(lesion slices among its top {args.per_round}):\n\n{table}\n"
    )
    print(table)
