"""Training over torch.distributed ranks (apps/qunet/train_cohort.py through qunet_app.tasks.ranks.run_ranks, what a
`multi_gpu`
training runs): two CPU ranks joined by gloo on loopback, each training its half of every batch, end with the
model one process trains from the same start, up to floating-point rounding; rank 0 alone publishes and writes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from filelock import FileLock

from live_server import APP
from qunet import build_network
from qunet_bench.synthetic import generate_stack

TINY = (4, 4, 8, 8, 16, 4)
REQUEST = {"max_epochs": 2, "steps_per_epoch": 4, "train_batch_size": 4, "seed": 3}


def make_cohort(root: Path) -> tuple[Path, list[str]]:
    """Two volumes with final labels (imported: every slice annotated) and a start model."""
    studies = root / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for i in range(2):
        stack = generate_stack("ct", i, (48, 48, 5))
        affine = np.diag([0.8, 0.8, 3.0, 1.0])
        nib.save(nib.Nifti1Image(stack.image.astype(np.int16), affine), studies / f"vol{i}.nii.gz")
        nib.save(nib.Nifti1Image(stack.label.astype(np.uint8), affine), studies / "labels" / "final" / f"vol{i}.nii.gz")
    torch.manual_seed(0)
    start = root / "start.pt"
    torch.save({"model": build_network(TINY).state_dict()}, start)
    return studies, [
        "--conf",
        "features",
        ",".join(map(str, TINY)),
        "--conf",
        "patch_size",
        "32",
        "--conf",
        "pretrained_path",
        str(start),
    ]


def fresh_app(root: Path, name: str) -> Path:
    app = root / name
    shutil.copytree(APP, app, ignore=shutil.ignore_patterns("model", "logs", "bin", "__pycache__"))
    return app


def weights(app: Path) -> dict[str, torch.Tensor]:
    return torch.load(app / "model" / "qunet.pt", weights_only=True)["model"]


def test_two_ranks_train_the_model_one_process_trains(tmp_path):
    studies, conf = make_cohort(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    one = fresh_app(tmp_path, "one")
    done = subprocess.run(
        [
            sys.executable,
            str(one / "train_cohort.py"),
            "--studies",
            str(studies),
            *conf,
            "--request",
            json.dumps(REQUEST),
            "--threads",
            "1",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    alone = json.loads(done.stdout.strip().splitlines()[-1])
    assert alone["ranks"] == 1 and alone["slices"] == 10 and alone["steps"] == 8

    two = fresh_app(tmp_path, "two")
    sys.path.insert(0, str(two))  # the app's `qunet_app`, as the server has it
    try:
        from qunet_app.tasks.ranks import run_ranks

        together = run_ranks(
            [
                str(two / "train_cohort.py"),
                "--studies",
                str(studies),
                *conf,
                "--threads",
                "1",
                "--request",
                json.dumps(REQUEST),
            ],
            2,
        )
    finally:
        sys.path.remove(str(two))
        for name in [m for m in sys.modules if m == "qunet_app" or m.startswith("qunet_app.")]:
            del sys.modules[name]
    assert together["ranks"] == 2 and together["steps"] == alone["steps"]
    assert abs(together["loss"] - alone["loss"]) < 1e-3, (together, alone)

    start = torch.load(tmp_path / "start.pt", weights_only=True)["model"]
    a, b = weights(one), weights(two)
    moved = torch.cat([(a[k] - start[k]).flatten() for k in a if a[k].is_floating_point()]).abs()
    apart = torch.cat([(a[k] - b[k]).flatten() for k in a if a[k].is_floating_point()]).abs()
    assert float(moved.median()) > 1e-3, "the training must have moved the weights for the comparison to mean anything"
    # rounding differs between a batch of 4 and two of 2; Adam turns a near-zero gradient's sign flip into a full
    # step for a handful of weights, so the bound is on nearly all weights and on the whole
    assert float(torch.quantile(apart, 0.99)) < 1e-5 and float(apart.norm() / moved.norm()) < 0.05, (
        float(torch.quantile(apart, 0.99)),
        float(apart.norm() / moved.norm()),
    )
    history = json.loads((two / "model" / "history.json").read_text())
    assert len(history) == 1 and history[0]["model"] is not None  # rank 0 alone wrote

    # a training running (the server's, holding the app's lock): the script refuses rather than publish beside it
    with FileLock(str(one / "model" / "qunet-train.lock"), timeout=0):
        refused = subprocess.run(
            [
                sys.executable,
                str(one / "train_cohort.py"),
                "--studies",
                str(studies),
                *conf,
                "--request",
                json.dumps(REQUEST),
                "--threads",
                "1",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert refused.returncode != 0 and "a training is running already" in refused.stderr, refused.stderr[-2000:]
