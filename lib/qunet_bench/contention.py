"""Train and scoring beside another busy process: `python -m qunet contention [--out contention.json]`.

A real `monailabel start_server` with the app's defaults over a copy of the repository's sample-data; the ground
truth of `--stack` (lesion slices and a few empty ones) is submitted as a label. Then, quiet and again beside
`--busy` processes each spinning on one core (a user's other work, a second server, a compile): *Train* from
scratch for `--steps` updates (the default recipe, one epoch of it by default), timed by the trainer's own clock,
and the disagreement re-score of every volume the server then starts by itself, timed from Train's end to its end.
Prints the seconds and the ratio busy / quiet of each; the app shares the cores with other processes
(qunet.threads).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from qunet_bench.cli import positive
from qunet_bench.data import find_pairs, load_cases
from qunet_bench.loop_bench import submit_truth
from qunet_bench.rescore import SAMPLES, _images
from qunet_bench.server import Server

BUSY_LOOP = "while True: pass"


def _submit_truth(server: Server, studies: Path, stack: str, workdir: Path) -> int:
    """The ground truth of `stack` on its lesion slices and three empty ones; the number of slices submitted."""
    case = load_cases(find_pairs(studies, SAMPLES / "ground-truth", include=[f"{stack}.*"]))[0]
    lesion = case.truth.any(axis=(0, 1))
    slices = [int(k) for k in lesion.nonzero()[0]] + [int(k) for k in (~lesion).nonzero()[0][::8][:3]]
    submit_truth(server, case, slices, workdir)
    return len(slices)


def _measure(server: Server, steps: int) -> dict:
    """Train (timed by the trainer), then the re-score of every volume the server starts by itself for the new model
    (timed from Train's end to the end of that disagreement run, as an annotator waits for it)."""
    before = server.last_task("scoring").get("id")
    r = requests.post(
        f"{server.url}/train/qunet?run_sync=true",
        timeout=7200,
        json={"max_epochs": 1, "steps_per_epoch": steps, "pretrained": False, "seed": 0},
    )
    r.raise_for_status()
    trained = time.perf_counter()
    history = json.loads((Path(server.app_dir) / "model" / "history.json").read_text())
    server.wait_for_task("scoring", after=before, method="qunet_disagreement")
    return {"train_seconds": history[-1]["seconds"], "rescore_seconds": round(time.perf_counter() - trained, 1)}


def run(args: argparse.Namespace) -> dict:
    root = Path(tempfile.mkdtemp(prefix="qunet-contention-", dir=args.workdir))
    studies = root / "studies"
    studies.mkdir()
    for image in _images(SAMPLES):
        shutil.copy(image, studies / image.name)
    try:
        with Server(studies, root) as server:  # the app's defaults
            server.wait_for_task("scoring", method="qunet_quality")  # the start-up scoring
            slices = _submit_truth(server, studies, args.stack, root)
            quiet = _measure(server, args.steps)
            hogs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(args.busy)]
            try:
                busy = _measure(server, args.steps)
            finally:
                for hog in hogs:
                    hog.kill()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {
        "quiet": quiet,
        "busy": busy,
        "busy_processes": args.busy,
        "steps": args.steps,
        "stack": args.stack,
        "annotated_slices": slices,
        "cores": len(os.sched_getaffinity(0)),
        "ratio": {k: round(busy[k] / quiet[k], 2) for k in ("train_seconds", "rescore_seconds")},
    }
    print(
        f"Train ({args.steps} updates): quiet {quiet['train_seconds']} s, beside {args.busy} busy process(es) "
        f"{busy['train_seconds']} s (x{result['ratio']['train_seconds']}); the re-score of sample-data after it: "
        f"quiet {quiet['rescore_seconds']} s, busy {busy['rescore_seconds']} s "
        f"(x{result['ratio']['rescore_seconds']})"
    )
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stack", default="lung1", help="sample-data stack whose ground truth is submitted")
    p.add_argument("--steps", type=positive, default=50, help="training updates per Train (the default epoch: 50)")
    p.add_argument("--busy", type=positive, default=1, help="competing processes, each spinning on one core")
    p.add_argument("--workdir", default=None, help="where the server's folder goes (default: the system's)")
    p.add_argument("--out", default=None, help="also write the figures to this JSON file")


def main(args: argparse.Namespace) -> None:
    result = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
