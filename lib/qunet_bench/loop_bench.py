"""The loop a user runs, measured: `python -m qunet loop [--studies confirmation-data] [--out loop.json]`.

A real `monailabel start_server` with the app's defaults over a copy of the stacks of `--studies` (full masks in its
ground-truth/ folder); a simulated annotator, for `--rounds` rounds of `--per-round` slices:

- `app`: asks *Next sample* and submits the ground truth of the served slices (most useful first, as many as the
  round still needs) with `annotated_slices`, until the round has its slices;
- `random` / `interval`: submits random slices, or evenly spaced ones (each stack's share in proportion to its
  depth, the slice farthest from the annotated ones; the `rounds` benchmark's baselines), through the same server;

then presses *Train* with the app's defaults (only `seed` set), waits for the server's re-score, and asks the
published model's infer for every volume: voxel Dice over every slice not annotated yet, and over those with
lesion, pooled over the stacks. AUBC = the mean of a method's round Dice; the paired differences of the app's pick
against each baseline come per seed, with a t interval over seeds. Each (method, seed) gets a fresh server.
"""

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import requests

from qunet.io import Stack, check_file, load_label, stack_id
from qunet.postprocess import MODES, postprocess

from qunet_bench.activelearning import LoopRun, pick_interval, pick_random
from qunet_bench.cli import positive
from qunet_bench.data import Case, find_pairs, load_cases, pooled_dice, test_counts
from qunet_bench.loop_plot import plot
from qunet_bench.server import Server

METHODS = ("app", "random", "interval")


def submit_truth(server: Server, case: Case, slices: list[int], work: Path) -> None:
    """The ground truth of `case` on `slices` (every slice annotated so far in this stack), as a label."""
    label = np.zeros(case.truth.shape, np.uint8)
    label[:, :, slices] = case.truth[:, :, slices]
    path = work / f"label-{case.name}.nii.gz"
    nib.save(nib.Nifti1Image(label, case.affine), path)
    with open(path, "rb") as f:
        r = requests.put(
            f"{server.url}/datastore/label",
            params={"image": case.name},
            timeout=600,
            data={"params": json.dumps({"annotated_slices": slices, "client_id": "annotator"})},
            files={"label": (path.name, f)},
        )
    r.raise_for_status()


def _app_round(server: Server, run: LoopRun, n: int, work: Path) -> int:
    """Next sample's slices until `n` are annotated this round; the number the app could not serve."""
    cases = {c.name: c for c in run.cases}
    done = 0
    while done < n:
        sample = requests.post(
            f"{server.url}/activelearning/qunet", json={"client_id": "annotator"}, timeout=600
        ).json()
        new = [k for k in sample.get("slices") or [] if k not in run.annotated.get(sample.get("id"), ())][: n - done]
        if not new:
            return n - done
        run.annotated[sample["id"]] |= set(new)
        submit_truth(server, cases[sample["id"]], sorted(run.annotated[sample["id"]]), work)
        done += len(new)
    return 0


def _evaluate(server: Server, run: LoopRun, work: Path) -> dict:
    """Dice of the server's infer answer on each stack's unannotated slices, pooled; and of the same answer after each
    post-processing (qunet.postprocess: what the server answers with `--conf postprocess MODE`)."""
    totals = {mode: np.zeros((2, 3), np.int64) for mode in MODES}
    per_stack: dict[str, dict] = {}
    for case in run.cases:
        test = [k for k in range(case.depth) if k not in run.annotated[case.name]]
        r = requests.post(
            f"{server.url}/infer/qunet",
            params={"image": case.name, "output": "image"},
            data={"params": "{}"},
            timeout=3600,
        )
        r.raise_for_status()
        answer = work / "infer"
        answer.write_bytes(r.content)
        named = answer.rename(work / f"infer{check_file(answer)}")  # in the image's format: NIfTI or NRRD
        found = load_label(named, Stack(case.volume, case.affine, case.name))  # (on the image's grid)
        for mode in MODES:
            counts, figures = test_counts(postprocess(found, mode)[:, :, test] > 0, case.truth[:, :, test])
            totals[mode] += counts
            if mode == "off":
                per_stack[case.name] = figures
            else:
                per_stack[case.name][mode] = figures
    return {
        **pooled_dice(totals["off"]),
        "stacks": per_stack,
        "postprocessed": {mode: pooled_dice(t) for mode, t in totals.items()},
    }


def run_loop(
    method: str, seed: int, args: argparse.Namespace, cases: list[Case], images: dict[str, Path]
) -> list[dict]:
    root = Path(tempfile.mkdtemp(prefix=f"qunet-loop-{method}-{seed}-", dir=args.workdir))
    (root / "studies").mkdir()
    for image in images.values():
        shutil.copy(image, root / "studies" / image.name)
    run = LoopRun(cases, {c.name: set() for c in cases}, {})
    rng, results = np.random.default_rng(seed), []
    try:
        with Server(root / "studies", root) as server:  # the app's defaults
            server.wait_for_task("scoring", method="qunet_quality")  # the start-up scoring
            for r in range(1, args.rounds + 1):
                start, unserved = time.perf_counter(), 0
                if method == "app":
                    unserved = _app_round(server, run, args.per_round, root)
                else:
                    picks = (pick_random if method == "random" else pick_interval)(run, args.per_round, rng)[0]
                    for name in sorted({name for name, _ in picks}):
                        run.annotated[name] |= {k for n, k in picks if n == name}
                        submit_truth(
                            server, next(c for c in cases if c.name == name), sorted(run.annotated[name]), root
                        )
                before = server.last_task("scoring").get("id"), server.last_task("train").get("id")
                trained = time.perf_counter()
                requests.post(f"{server.url}/train/qunet", json={"seed": seed}, timeout=600).raise_for_status()
                server.wait_for_task("train", after=before[1])  # as Slicer's Train: in the background
                trained = time.perf_counter() - trained
                server.wait_for_task("scoring", after=before[0], method="qunet_disagreement")  # the server's re-score
                found = _evaluate(server, run, root)
                annotated = {name: sorted(ks) for name, ks in run.annotated.items()}
                results.append(
                    {
                        "method": method,
                        "seed": seed,
                        "round": r,
                        "unserved": unserved,
                        "annotated": sum(map(len, annotated.values())),
                        "lesion_annotated": sum(
                            len(set(ks) & set(c.lesion_slices))
                            for c in cases
                            for n, ks in annotated.items()
                            if n == c.name
                        ),
                        "picked": annotated,
                        "seconds": round(time.perf_counter() - start, 1),
                        "train_seconds": round(trained, 1),
                        **found,
                    }
                )
                print(
                    f"{method} seed {seed} round {r}: {results[-1]['annotated']} slices "
                    f"({results[-1]['lesion_annotated']} with lesion), Dice {found['dice']:.3f}, on lesion slices "
                    f"{found['dice_lesion_slices']:.3f} (round {results[-1]['seconds']} s, Train "
                    f"{results[-1]['train_seconds']} s)",
                    flush=True,
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return results


def summary(results: list[dict], postprocessed: str | None = None) -> dict:
    """AUBC per method and seed, and the app's paired differences against each baseline (mean, t interval); of the
    server's answer, or of it post-processed by `postprocessed` (a qunet.postprocess mode)."""
    from scipy import stats

    aubc: dict[str, dict[int, float]] = {}
    for m in {r["method"] for r in results}:
        for s in {r["seed"] for r in results if r["method"] == m}:
            dice = [
                r["postprocessed"][postprocessed]["dice"] if postprocessed else r["dice"]
                for r in results
                if r["method"] == m and r["seed"] == s
            ]
            aubc.setdefault(m, {})[s] = float(np.mean(dice))
    out = {"aubc": {m: {"mean": float(np.mean(list(v.values()))), "seeds": v} for m, v in aubc.items()}}
    for base in ("random", "interval"):
        seeds = sorted(set(aubc.get("app", {})) & set(aubc.get(base, {})))
        diff = [aubc["app"][s] - aubc[base][s] for s in seeds]
        if diff:
            half = float(stats.t.ppf(0.975, len(diff) - 1) * stats.sem(diff)) if len(diff) > 1 else float("nan")
            out[f"app_minus_{base}"] = {"mean": float(np.mean(diff)), "interval95": half, "seeds": len(diff)}
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--studies", default="confirmation-data", help="images, with full masks in its ground-truth/")
    p.add_argument("--include", nargs="*", default=[], help="image file name globs to use (default: all)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--seeds", type=positive, default=3)
    p.add_argument("--rounds", type=positive, default=3)
    p.add_argument("--per-round", type=positive, default=4, help="slices annotated per round, cohort-wide")
    p.add_argument("--workdir", default=None, help="where the servers' folders go (default: the system's)")
    p.add_argument("--out", default=None, help="also write every round and the summary to this JSON file")


def main(args: argparse.Namespace) -> None:
    pairs = find_pairs(args.studies, include=args.include)
    cases, images = load_cases(pairs), {stack_id(image): image for image, _ in pairs}
    results = []
    for seed in range(args.seeds):
        for method in args.methods:
            results += run_loop(method, seed, args, cases, images)
            if args.out:  # written as it goes: a long run keeps what it finished
                settings = {k: v for k, v in vars(args).items() if k != "run"}  # (run: the sub-command)
                Path(args.out).write_text(
                    json.dumps(
                        {
                            "rounds": results,
                            "summary": summary(results),
                            "summary_largest": summary(results, "largest"),
                            "settings": settings,
                        },
                        indent=1,
                    )
                )
    if args.out:
        title = f"{', '.join(c.name for c in cases)}: {args.per_round} slices a round, the app's defaults"
        plot(results, Path(args.out).with_suffix(".png"), title)
    print(json.dumps(summary(results), indent=1))
