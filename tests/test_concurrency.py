"""Concurrency: annotators asking at the same moment, a bounded load test, scoring while training.

A live server with MONAI Label's default automatic scoring (start-up scoring, and every Next sample asks for a
scoring run). `hold_seconds` is short so that the test can see a held slice offered again. One torch thread per
process: the test machine's cores are shared, and oversubscribed OpenMP threads make a tiny network 20x slower.
"""

import json
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
import torch

from app_inprocess import app_client
from live_server import LiveServer, wait_for
from qunet import build_network
from qunet_bench.synthetic import generate_stack

TINY = (4, 4, 8, 8, 16, 4)
HOLD = 3
# explicit: an in-process test earlier in the session exports its MONAI Label settings to os.environ
ENV = {"OMP_NUM_THREADS": "1", "MONAI_LABEL_AUTO_UPDATE_SCORING": "true", "MONAI_LABEL_DATASTORE_AUTO_RELOAD": "true"}
CONF = {
    "patch_size": "32",
    "features": ",".join(map(str, TINY)),
    "slices_per_sample": "2",
    "q0": "1.01",
    "hold_seconds": str(HOLD),
}
AFFINE = np.diag([0.8, 0.8, 4.0, 1.0])
SHAPE = (48, 48, 16)
IMAGES = ("ct1", "ct2", "ct3", "ct4")


def make_studies(folder: Path, names=IMAGES) -> Path:
    folder.mkdir(parents=True)
    for i, name in enumerate(names):
        nib.save(
            nib.Nifti1Image(generate_stack("ct", i + 1, SHAPE).image.astype(np.int16), AFFINE),
            folder / f"{name}.nii.gz",
        )
    return folder


def make_weights(path: Path) -> Path:
    torch.manual_seed(0)
    torch.save({"model": build_network(TINY).state_dict()}, path)
    return path


def image_infos(url: str) -> dict[str, dict]:
    objects = requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=30).json()["objects"]
    return {k: v["image"]["info"] for k, v in objects.items()}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("concurrency")
    srv = LiveServer(make_studies(root / "studies"), root, conf=CONF, env=ENV).start()
    yield srv
    srv.stop()
    print(srv.tail(20))


def next_sample(server, client: str) -> dict:
    r = requests.post(f"{server.url}/activelearning/qunet", json={"client_id": client}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def overlap(a: dict, b: dict) -> set[int]:
    return set(a["slices"]) & set(b["slices"]) if a and b and a["id"] == b["id"] else set()


def test_held_slices_are_offered_again_after_hold_seconds(server):
    first = next_sample(server, "alice")
    assert first["phase"] == "initial" and first["slices"]  # no model yet: the quality pick
    other = next_sample(server, "bob")
    assert other and not overlap(first, other), "a slice served to alice was offered to bob while held"
    time.sleep(HOLD + 1.1)  # alice submitted nothing: her hold ends
    again = next_sample(server, "bob")
    assert (again["id"], again["slices"]) == (first["id"], first["slices"]), "expired hold not offered again"


def test_simultaneous_next_sample_gets_disjoint_slices(server):
    for round_ in range(2):
        time.sleep(HOLD + 1.1)  # earlier holds end: every round competes for the same best slices
        clients = [f"r{round_}-{i}" for i in range(4)]
        barrier = threading.Barrier(len(clients))

        def ask(client):
            barrier.wait(30)
            return next_sample(server, client)

        with ThreadPoolExecutor(len(clients)) as pool:
            answers = list(pool.map(ask, clients))
        assert sum(bool(a["id"]) for a in answers) >= 2, answers
        for i, a in enumerate(answers):
            for b in answers[i + 1 :]:
                assert not overlap(a, b), f"two annotators got the same slices: {a['id']} {a['slices']} / {b['slices']}"


def test_load_next_sample_and_infer(server, tmp_path):
    """200 Next sample and 50 infer requests from 8 threads: all answer; latencies are printed (not asserted).

    A model appears just before (as after training): Next sample queues its disagreement scoring meanwhile."""
    make_weights(Path(server.app_dir, "model", "qunet.pt"))
    tasks_before = len(requests.get(f"{server.url}/scoring/", params={"all": "true"}, timeout=30).json())
    jobs = [("next", f"load-{i % 8}") for i in range(200)] + [("infer", IMAGES[i % len(IMAGES)]) for i in range(50)]
    np.random.default_rng(0).shuffle(jobs)

    def run(job):
        kind, arg = job
        start = time.perf_counter()
        if kind == "next":
            r = requests.post(f"{server.url}/activelearning/qunet", json={"client_id": arg}, timeout=300)
        else:
            r = requests.post(
                f"{server.url}/infer/qunet",
                params={"image": arg, "output": "image"},
                data={"params": "{}"},
                timeout=300,
            )
        return kind, r.status_code, time.perf_counter() - start, r.content

    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, jobs))
    wall = time.perf_counter() - start
    assert [s for _, s, _, _ in results] == [200] * len(jobs), [(k, s, c[:200]) for k, s, _, c in results if s != 200]
    label = tmp_path / "pred.nii.gz"
    label.write_bytes(next(c for k, _, _, c in results if k == "infer"))
    assert nib.load(label).shape == SHAPE
    for kind in ("next", "infer", "all"):
        times = sorted(t for k, _, t, _ in results if kind in (k, "all"))
        p95 = times[min(len(times) - 1, int(round(0.95 * len(times))) - 1)]
        print(
            f"\nLOAD {kind:5s}: n={len(times)} p50={statistics.median(times) * 1000:.0f} ms "
            f"p95={p95 * 1000:.0f} ms max={times[-1] * 1000:.0f} ms",
            end="",
        )
    print(f"\nLOAD wall {wall:.1f} s, {len(jobs) / wall:.1f} requests/s")
    # every Next sample asks for a re-score: runs are queued only with work to do, at most one waiting per method
    scoring = requests.get(f"{server.url}/scoring/", params={"all": "true"}, timeout=30).json()
    print(f"LOAD scoring runs queued by 200 Next sample: {len(scoring) - tasks_before}")
    assert sum(t["status"] == "SUBMITTED" for t in scoring) <= 2, [t["status"] for t in scoring]


def label_for(sample: dict, path: Path) -> Path:
    label = np.zeros(SHAPE, np.uint8)
    label[10:20, 12:22, sample["slices"]] = 1
    nib.save(nib.Nifti1Image(label, AFFINE), path)
    return path


def save(server, sample: dict, path: Path, client: str) -> dict:
    with open(label_for(sample, path), "rb") as f:
        r = requests.put(
            f"{server.url}/datastore/label",
            params={"image": sample["id"]},
            timeout=120,
            data={"params": json.dumps({"client_id": client})},
            files={"label": (path.name, f)},
        )
    assert r.status_code == 200, r.text
    return r.json()


def test_scoring_while_training(server, tmp_path):
    time.sleep(HOLD + 1.1)  # the load test's holds end
    saved = {}
    for i in range(2):
        sample = next_sample(server, "trainer")
        assert sample["id"], "nothing to annotate"
        saved[sample["id"]] = set(save(server, sample, tmp_path / f"l{i}.nii.gz", "trainer")["annotated_slices"])
    published = Path(server.app_dir, "model", "qunet.pt")  # the load test's model: the disagreement phase
    before = published.stat().st_mtime_ns
    r = requests.post(
        f"{server.url}/train/qunet", json={"max_epochs": 30, "steps_per_epoch": 20, "train_batch_size": 4}, timeout=30
    )
    assert r.status_code == 200, r.text
    wait_for(lambda: published.stat().st_mtime_ns != before, 240, "training publishing a model")

    def training() -> bool:
        return requests.get(f"{server.url}/train/", timeout=30).json()["status"] == "RUNNING"

    overlapped = 0
    for i in range(20):  # while the trainer (a subprocess) publishes models: score, serve and save
        if not training():
            break
        r = requests.post(f"{server.url}/scoring/qunet_disagreement?run_sync=true", timeout=300)
        assert r.status_code in (200, 429), r.text  # 429: a background scoring run is under way
        sample = next_sample(server, f"annotator-{i}")
        if sample["id"]:
            saved.setdefault(sample["id"], set()).update(
                save(server, sample, tmp_path / f"m{i}.nii.gz", f"annotator-{i}")["annotated_slices"]
            )
        overlapped += training()
    assert overlapped, "training ended before any scoring ran alongside it: give it more epochs"
    done = wait_for(
        lambda: (s := requests.get(f"{server.url}/train/", timeout=30).json())["status"] in ("DONE", "ERROR") and s,
        300,
        "training",
    )
    assert done["status"] == "DONE", done
    objects = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=30).json()["objects"]
    for image_id, annotated in saved.items():  # no update lost between the server and the two subprocesses
        assert "final" in objects[image_id]["labels"]
        assert annotated <= set(objects[image_id]["image"]["info"]["qunet_annotated"])
    assert all(
        v["image"]["info"].get("qunet_quality") and v["image"]["info"].get("qunet_disagreement")
        for v in objects.values()
    )
    json.loads(Path(server.studies, "datastore_v2.json").read_text())


@pytest.fixture
def own_environment():
    """app_client exports its MONAI Label settings to os.environ: keep them from later live servers."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_in_process_next_sample_calls_are_serialised(tmp_path, own_environment):
    """The app's own lock: Next sample called from 8 threads at once (as a threaded server would) never hands
    the same slice to two clients."""
    studies = make_studies(tmp_path / "studies")
    app_client(studies, {**{k: v for k, v in CONF.items() if k != "hold_seconds"}, "slices_per_sample": "2"})
    from monailabel.interfaces.utils.app import app_instance

    app = app_instance()
    app.scoring({"method": "qunet_quality"})
    for round_ in range(2):
        barrier = threading.Barrier(8)

        def ask(i):
            barrier.wait(30)
            return app.next_sample({"strategy": "qunet", "client_id": f"{round_}-{i}"})

        with ThreadPoolExecutor(8) as pool:
            answers = [a for a in pool.map(ask, range(8)) if a.get("id")]
        assert answers or round_, "nothing served"
        for i, a in enumerate(answers):
            for b in answers[i + 1 :]:
                assert not overlap(a, b), f"same slices for two clients: {a['id']} {a['slices']} / {b['slices']}"
