"""Scoring throughput over torchrun ranks (`python -m qunet bench --only ranks`): the app's cohort scoring
(apps/qunet/score_cohort.py) on the same generated volumes with 1 rank and with N ranks, one torch thread each,
timed from the first volume to the slowest rank's last (process start-up not counted); and the arithmetic of a
million-slice re-score from the measured per-slice cost."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from qunet_bench.live_bench import write_studies
from qunet_bench.server import copy_app

MILLION = 1_000_000


def _score(app: Path, studies: Path, model: Path, ranks: int, features: str, patch: int) -> dict:
    script = str(app / "score_cohort.py")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), script]
    command = (launcher if ranks > 1 else [sys.executable, script]) + [
        "--studies",
        str(studies),
        "--model",
        str(model),
        "--threads",
        "1",
        "--conf",
        "features",
        features,
        "--conf",
        "patch_size",
        str(patch),
    ]
    # TMPDIR: torchrun leaves its rendezvous folders there; the bench's work folder is removed after it
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=7200,
        env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(app.parent)},
    )
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def ranks_bench(
    ranks: int = 2,
    volumes: int = 8,
    shape=(256, 256, 12),
    features: str = "8,16,32,64,128,8",
    patch: int = 96,
    workdir: str | None = None,
) -> dict:
    import torch

    from qunet.network import build_network

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        model = root / "model.pt"
        torch.save({"model": build_network(tuple(int(f) for f in features.split(","))).state_dict()}, model)
        app = copy_app(root / "app")  # its script records the model's agreement in its app folder: not the checkout's
        runs = {}
        for n in (1, ranks):
            studies = root / f"studies-{n}"
            write_studies(studies, volumes, shape)
            runs[n] = _score(app, studies, model, n, features, patch)["disagreement"]
    slices = volumes * shape[2]
    one, many = runs[1]["seconds"], runs[ranks]["seconds"]
    per_slice = one / slices  # seconds per slice on one CPU thread
    return {
        "volumes": volumes,
        "shape": list(shape),
        "features": features,
        "patch_size": patch,
        "ranks": ranks,
        "seconds": {"1": one, str(ranks): many},
        "speedup": round(one / many, 2),
        "slices_per_s": {"1": round(slices / one, 2), str(ranks): round(slices / many, 2)},
        "million_slices_hours_one_thread": round(MILLION * per_slice / 3600, 1),
    }


def render(result: dict) -> list[str]:
    r = result
    n = str(r["ranks"])
    return [
        f"disagreement scoring, {r['volumes']} volumes {r['shape']}: 1 rank {r['slices_per_s']['1']} slices/s, "
        f"{n} ranks {r['slices_per_s'][n]} slices/s (x{r['speedup']}, one thread per rank); a million slices "
        f"at the one-rank rate: {r['million_slices_hours_one_thread']} h"
    ]
