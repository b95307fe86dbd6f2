"""Scoring a cohort over torchrun ranks (apps/qunet/score_cohort.py, through qunet_app.tasks.ranks.run_ranks as the
server runs it
on a multi-GPU machine): two CPU ranks joined by gloo on loopback score every volume exactly once, into the records
the server reads, with the same results as one process."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch

from live_server import APP, records_on_disk
from qunet import build_network
from qunet_bench.synthetic import generate_stack

TINY = (4, 4, 8, 8, 16, 4)
VOLUMES = [f"vol{i}" for i in range(5)]  # odd: the shards differ in size; the last one an NRRD file


def make_cohort(root: Path) -> tuple[Path, Path, list[str]]:
    studies = root / "studies"
    studies.mkdir()
    for i, name in enumerate(VOLUMES):
        stack = generate_stack("ct", i, (40, 40, 6 + i))
        if name == VOLUMES[-1]:
            sitk.WriteImage(
                sitk.GetImageFromArray(np.transpose(stack.image.astype(np.int16), (2, 1, 0))),
                str(studies / f"{name}.nrrd"),
            )
        else:
            nib.save(
                nib.Nifti1Image(stack.image.astype(np.int16), np.diag([0.8, 0.8, 3.0, 1.0])), studies / f"{name}.nii.gz"
            )
    app = root / "app"
    shutil.copytree(APP, app, ignore=shutil.ignore_patterns("model", "logs", "bin", "__pycache__"))
    torch.manual_seed(0)
    model = root / "model.pt"
    torch.save({"model": build_network(TINY).state_dict()}, model)
    conf = [
        "--conf",
        "features",
        ",".join(map(str, TINY)),
        "--conf",
        "patch_size",
        "32",
        "--conf",
        "q0",
        "0.9",
        "--conf",
        "pretrained_path",
        str(model),
    ]
    return studies, app, conf


def run(command: list[str], cwd: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def torchrun(app: Path, studies: Path, conf: list[str], *more: str) -> dict:
    sys.path.insert(0, str(app))  # the app's `qunet_app`, as the server has it
    try:
        from qunet_app.tasks.ranks import run_ranks

        return run_ranks([str(app / "score_cohort.py"), "--studies", str(studies), "--threads", "1", *conf, *more], 2)
    finally:
        sys.path.remove(str(app))
        for name in [m for m in sys.modules if m == "qunet_app" or m.startswith("qunet_app.")]:
            del sys.modules[name]


def test_two_ranks_score_each_volume_once_as_one_process_would(tmp_path, system_tmp):
    studies, app, conf = make_cohort(tmp_path)
    totals = torchrun(app, studies, conf)
    assert totals["ranks"] == 2
    assert not list(system_tmp.iterdir()), "torchrun's folders are left in the temporary folder"
    for method in ("quality", "disagreement"):
        assert totals[method].pop("seconds") > 0
        assert totals[method] == {"scored": len(VOLUMES), "skipped": 0, "failed": 0}, totals
    two_ranks = records_on_disk(studies)
    assert sorted(two_ranks) == VOLUMES
    assert json.loads((app / "model" / "agreement.json").read_text())[-1]["open_slices"] == sum(6 + i for i in range(5))

    alone = tmp_path / "alone"
    alone.mkdir()
    for image in studies.glob("vol*"):
        shutil.copy(image, alone)
    one = run([sys.executable, str(app / "score_cohort.py"), "--studies", str(alone), "--threads", "1", *conf], app)
    assert one["ranks"] == 1 and one["disagreement"]["scored"] == len(VOLUMES)
    one_rank = records_on_disk(alone)
    for name in VOLUMES:
        for key in ("qunet_quality", "qunet_disagreement"):
            a, b = dict(two_ranks[name][key]), dict(one_rank[name][key])
            del a["source"], b["source"]  # signatures of two copies (inode, time): differ by design
            assert a == b, (name, key)

    # what the server runs on a multi-GPU machine after a training: disagreement only, rank 0 reporting progress;
    # every record is current, so nothing is read again
    again = torchrun(app, studies, conf, "--methods", "disagreement", "--progress")
    assert "quality" not in again
    assert {k: again["disagreement"][k] for k in ("scored", "skipped", "failed")} == {
        "scored": 0,
        "skipped": len(VOLUMES),
        "failed": 0,
    }, again
    progress = json.loads((app / "model" / "scoring_qunet_disagreement.json").read_text())
    assert progress["state"] == "done" and progress["volumes_total"] == 3  # rank 0's share: volumes 0, 2, 4
