"""The live-server part of `python -m qunet bench`: Next sample latency over N volumes of a real server
(qunet_bench.server) started with its defaults, the volumes scored by the server itself."""

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from qunet_bench.server import Server


def write_studies(folder: Path, count: int, shape=(16, 16, 8), seed: int = 0) -> None:
    """`count` small textured int16 NIfTI volumes vol0000.nii.gz ... in `folder`."""
    import nibabel as nib
    from scipy import ndimage

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        base = ndimage.gaussian_filter(rng.normal(size=shape), (1.5, 1.5, 0)) * 300 + 400
        base += rng.normal(scale=20, size=shape)
        nib.save(nib.Nifti1Image(base.astype(np.int16), np.diag([0.7, 0.7, 5.0, 1.0])), folder / f"vol{i:04d}.nii.gz")


def _save_label(session, url: str, image_id: str, slices: list[int], shape, work: Path) -> None:
    """A final label of the answer's slices (a small square on each), as an annotator submits it."""
    import nibabel as nib

    label = np.zeros(shape, np.uint8)
    label[4:8, 4:8, slices] = 1
    path = work / "label.nii.gz"
    nib.save(nib.Nifti1Image(label, np.diag([0.7, 0.7, 5.0, 1.0])), path)
    with open(path, "rb") as f:
        session.put(
            f"{url}/datastore/label",
            params={"image": image_id},
            timeout=60,
            files={"label": (path.name, f)},
            data={"params": json.dumps({"annotated_slices": slices})},
        ).raise_for_status()


def _latencies(
    session, url: str, requests_count: int, client: str, label_every: int = 0, shape=None, work: Path | None = None
) -> tuple[dict, dict]:
    """Next sample timed `requests_count` times; every `label_every`-th answer is then submitted as a label (not
    timed: the next answer pays for the ranking's update)."""
    times, last = [], {}
    for i in range(requests_count):
        t = time.perf_counter()  # a new client each time: slices held for the others, so every answer is stored
        r = session.post(f"{url}/activelearning/qunet", json={"client_id": f"{client}-{i}"}, timeout=60)
        times.append(time.perf_counter() - t)
        r.raise_for_status()
        last = r.json()
        if label_every and i % label_every == label_every - 1 and last.get("id"):
            _save_label(session, url, last["id"], last["slices"], shape, work)
    ms = np.array(times) * 1000
    return (
        {
            "requests": requests_count,
            "labels_saved": requests_count // label_every if label_every else 0,
            "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p95_ms": round(float(np.percentile(ms, 95)), 1),
            "max_ms": round(float(ms.max()), 1),
        },
        {"phase": last.get("phase"), "id": last.get("id"), "slices": last.get("slices")},
    )


def next_sample_bench(
    volumes: int = 1000,
    requests_count: int = 100,
    shape=(16, 16, 8),
    auto_scoring: bool = True,
    workdir: str | None = None,
    label_every: int = 5,
) -> dict:
    """Latency of POST /activelearning/qunet over `volumes` volumes scored by the server itself, in both phases of the
    strategy, the server started as README starts it (MONAI Label's auto-update scoring on unless `auto_scoring` is
    False), with a label saved after every `label_every`-th answer; and a restart's time to its first answer."""
    import requests
    import torch

    from qunet.network import build_network

    features = "4,4,8,8,16,4"
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        write_studies(root / "studies", volumes, shape)
        model, parked = root / "pretrained.pt", root / "pretrained.off"
        torch.manual_seed(0)
        torch.save({"model": build_network(tuple(int(f) for f in features.split(","))).state_dict()}, parked)
        conf = {"patch_size": "32", "features": features, "q0": "1.01", "pretrained_path": str(model)}
        out: dict = {
            "volumes": volumes,
            "volume_shape": list(shape),
            "auto_update_scoring": auto_scoring,
            "write_seconds": round(time.perf_counter() - t, 1),
        }
        env = {} if auto_scoring else {"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}
        timed = dict(label_every=label_every, shape=shape, work=root)
        server = Server(root / "studies", root, conf, env)
        with requests.Session() as session:
            t = time.perf_counter()
            with server:  # no model yet: the initial phase
                session.post(
                    f"{server.url}/activelearning/qunet", json={"client_id": "first"}, timeout=600
                ).raise_for_status()
                out["unscored_start_to_first_answer_seconds"] = round(time.perf_counter() - t, 1)
                if not auto_scoring:
                    session.post(f"{server.url}/scoring/qunet_quality", timeout=60).raise_for_status()
                server.wait_for_task("scoring", method="qunet_quality")
                out["quality_scoring_seconds"] = round(time.perf_counter() - t, 1)  # from the start
                out["initial"], out["initial_answer"] = _latencies(session, server.url, requests_count, "a", **timed)
                before, t = server.last_task("scoring").get("id"), time.perf_counter()
                os.rename(parked, model)  # a model appears: the server re-scores by itself
                server.wait_for_task("scoring", after=before, method="qunet_disagreement")
                out["disagreement_scoring_seconds"] = round(time.perf_counter() - t, 1)
                out["disagreement"], out["disagreement_answer"] = _latencies(
                    session, server.url, requests_count, "b", **timed
                )
            t = time.perf_counter()
            with server:  # a restart on the scored volumes
                session.post(
                    f"{server.url}/activelearning/qunet", json={"client_id": "c"}, timeout=600
                ).raise_for_status()
                out["startup_to_first_answer_seconds"] = round(time.perf_counter() - t, 1)
    return out


# ----------------------------------------------------------------------------------------------- memory
