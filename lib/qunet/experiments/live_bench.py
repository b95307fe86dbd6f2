"""The live-server part of `python -m qunet bench`: Next sample latency over N volumes of a real server
(qunet.experiments.server), and the strategy's ranking and record write costs."""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from qunet.experiments.bench import APP, _best
from qunet.experiments.server import Server


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
        session.put(f"{url}/datastore/label", params={"image": image_id}, timeout=60, files={"label": (path.name, f)},
                    data={"params": json.dumps({"annotated_slices": slices})}).raise_for_status()


def _latencies(session, url: str, requests_count: int, client: str, label_every: int = 0, shape=None,
               work: Path | None = None) -> tuple[dict, dict]:
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
    return ({"requests": requests_count, "labels_saved": requests_count // label_every if label_every else 0,
             "p50_ms": round(float(np.percentile(ms, 50)), 1),
             "p95_ms": round(float(np.percentile(ms, 95)), 1), "max_ms": round(float(ms.max()), 1)},
            {"phase": last.get("phase"), "id": last.get("id"), "slices": last.get("slices")})


def _app_modules(app_dir: Path):
    """The app's own classes (its `lib` package), imported from `app_dir`."""
    import importlib

    if str(app_dir) not in sys.path:
        sys.path.insert(0, str(app_dir))
    return (importlib.import_module("lib.conf"), importlib.import_module("lib.datastore"),
            importlib.import_module("lib.scoring"), importlib.import_module("lib.strategies"))


def score_in_process(app_dir: Path, studies: Path, conf: dict[str, str], model: Path) -> dict:
    """Run the app's qunet_quality and qunet_disagreement scoring methods over `studies`, in this process."""
    conf_mod, ds_mod, scoring, strategies = _app_modules(app_dir)
    app_conf = conf_mod.AppConf.from_conf(conf)
    datastore = ds_mod.QUNetDatastore(str(studies), auto_reload=False)
    out = {}
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # set-up, not a measured figure: small networks run best on one thread
    t = time.perf_counter()
    out["qunet_quality"] = scoring.QualityScoring(app_conf)({}, datastore)
    out["qunet_quality_seconds"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    out["qunet_disagreement"] = scoring.DisagreementScoring(app_conf, lambda: str(model))({}, datastore)
    out["qunet_disagreement_seconds"] = round(time.perf_counter() - t, 1)
    torch.set_num_threads(threads)
    # where a Next sample's time goes, in this process: the strategy's first pick (its ranking built from every
    # volume's records), a later pick (the ranking updated with the one volume whose record changed), the write
    strategy = strategies.QUNetStrategy(app_conf, lambda: str(model), str(studies.parent))
    image_id = datastore.list_images()[0]
    t = time.perf_counter()
    strategy.snapshot(datastore, "bench")
    build = time.perf_counter() - t

    def write_then_pick() -> None:
        datastore.update_image_info(image_id, {"qunet_served": {"other": {"slices": [0], "ts": time.time()}}})
        strategy.snapshot(datastore, "bench")

    pick = _best(write_then_pick, 3)
    write = _best(lambda: datastore.update_image_info(image_id, {"qunet_served": {"bench": {"slices": [0], "ts": time.time()}}}), 3)
    text = datastore._datastore.model_dump_json(exclude={"base_path"}, indent=2, fallback=str)
    out["in_process"] = {"ranking_build_ms": round(build * 1000, 3), "write_and_pick_ms": round(pick * 1000, 3),
                         "record_write_ms": round(write * 1000, 3),
                         "datastore_json_mb": round(len(text) / 2**20, 2),
                         "records_mb": round(sum(f.stat().st_size for f in studies.glob("qunet_records.sqlite*")) / 2**20, 2)}
    return out


def next_sample_bench(volumes: int = 1000, requests_count: int = 100, shape=(16, 16, 8), auto_scoring: bool = True,
                      workdir: str | None = None, label_every: int = 5) -> dict:
    """Latency of POST /activelearning/qunet with `volumes` scored volumes, in both phases of the strategy, the
    server started as README starts it (MONAI Label's auto-update scoring on unless `auto_scoring` is False), with a
    label saved after every `label_every`-th answer.

    The volumes are scored by the app's own scoring classes in this process first (one datastore write at the
    end); the server, started on them, then confirms both scorings are up to date (every image skipped)."""
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
        torch.save({"model": build_network(tuple(int(f) for f in features.split(","))).state_dict()}, model)
        conf = {"patch_size": "32", "features": features, "q0": "1.01", "pretrained_path": str(model)}
        out: dict = {"volumes": volumes, "volume_shape": list(shape), "auto_update_scoring": auto_scoring,
                     "write_seconds": round(time.perf_counter() - t, 1)}
        out["scoring"] = score_in_process(APP, root / "studies", conf, model)
        os.rename(model, parked)  # no model: the initial phase (rename keeps the file's signature)
        t = time.perf_counter()
        env = {} if auto_scoring else {"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}
        with Server(root / "studies", root, conf, env) as server, requests.Session() as session:
            session.post(f"{server.url}/activelearning/qunet", json={"client_id": "first"}, timeout=600).raise_for_status()
            out["startup_to_first_answer_seconds"] = round(time.perf_counter() - t, 1)
            t = time.perf_counter()
            r = session.post(f"{server.url}/scoring/qunet_quality", params={"run_sync": "true"}, timeout=3600)
            r.raise_for_status()
            out["quality_rescoring"] = {**r.json(), "seconds": round(time.perf_counter() - t, 2)}  # all skipped
            timed = dict(label_every=label_every, shape=shape, work=root)
            out["initial"], out["initial_answer"] = _latencies(session, server.url, requests_count, "bench", **timed)
            os.rename(parked, model)
            t = time.perf_counter()
            r = session.post(f"{server.url}/scoring/qunet_disagreement", params={"run_sync": "true"}, timeout=3600)
            r.raise_for_status()
            out["disagreement_rescoring"] = {**r.json(), "seconds": round(time.perf_counter() - t, 2)}
            out["disagreement"], out["disagreement_answer"] = _latencies(session, server.url, requests_count, "bench-2",
                                                                         **timed)
    return out


# ----------------------------------------------------------------------------------------------- memory
