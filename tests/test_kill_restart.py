"""A real server SIGKILLed (the whole process group: server, scoring and training subprocesses) while a client
submits labels, quality scoring runs and training publishes models: after a restart every label answered 200 is on
disk with its records, the datastore JSON parses, the published model and the train stats are complete, and the
quality records computed before the kill are kept and not recomputed. (Kills of one save or publish: test_faults.py.)
"""

import contextlib
import json
import shutil
import signal
import threading
from pathlib import Path

import pytest
import requests
from filelock import FileLock

from live_server import LiveServer, records_on_disk, wait_for
from qunet import build_network
from qunet.io import load_label, load_stack
from qunet.network import load_weights
from stacks import write_label, write_stack

TINY = (4, 4, 8, 8, 16, 4)
CONF = {"patch_size": "32", "features": ",".join(map(str, TINY))}
BIG = 20  # large stacks, so that quality scoring of all of them takes a while
SMALL = ("lab0", "lab1", "lab2")  # small stacks the client labels
SMALL_SHAPE = (48, 48, 16)


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    folder = root / "studies"
    folder.mkdir()
    write_stack(root / "big.nii.gz", (256, 256, 40), seed=1)
    for i in range(BIG):
        shutil.copy(root / "big.nii.gz", folder / f"big{i:02d}.nii.gz")
    for i, name in enumerate(SMALL):
        write_stack(folder / f"{name}.nii.gz", SMALL_SHAPE, seed=10 + i)
    return folder


class Storm(threading.Thread):
    """Submits labels one after another; remembers which were answered 200 and which one is in flight."""

    def __init__(self, url: str, folder: Path) -> None:
        super().__init__(daemon=True)
        self.url, self.folder = url, folder
        self.done: list[tuple[str, list[int], int]] = []  # (image, slices, square size) answered 200
        self.failed: list[str] = []
        self.in_flight: tuple[str, list[int], int] | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        for j in range(10000):
            if self.stop.is_set():
                return
            image, slices, size = SMALL[j % 3], [(j // 3) % SMALL_SHAPE[2]], 2 + j % 23
            path = self.folder / f"label-{j}.nii.gz"
            write_label(path, SMALL_SHAPE, slices, size)
            self.in_flight = (image, slices, size)
            try:
                with open(path, "rb") as f:
                    r = requests.put(
                        f"{self.url}/datastore/label",
                        params={"image": image},
                        data={"params": json.dumps({"annotated_slices": slices, "client_id": "storm"})},
                        files={"label": (path.name, f)},
                        timeout=60,
                    )
            except requests.RequestException:
                return  # the server was killed
            if r.status_code == 200:
                self.done.append((image, slices, size))
                self.in_flight = None
            else:
                self.failed.append(r.text)
                return


def quality_on_disk(studies: Path) -> dict[str, dict]:
    return {k: v["qunet_quality"] for k, v in records_on_disk(studies).items() if v.get("qunet_quality")}


def test_sigkill_mid_save_scoring_training_then_restart(studies, tmp_path):
    workdir = studies.parent
    # scoring only when asked; one torch thread (shared cores); explicit, as in-process tests export their settings
    env = {
        "MONAI_LABEL_AUTO_UPDATE_SCORING": "false",
        "MONAI_LABEL_DATASTORE_AUTO_RELOAD": "true",
        "OMP_NUM_THREADS": "1",
    }
    server = LiveServer(studies, workdir, conf=CONF, env=env).start()
    model = Path(server.app_dir, "model", "qunet.pt")
    try:
        for image in SMALL:  # something to train on
            path = tmp_path / f"seed-{image}.nii.gz"
            write_label(path, SMALL_SHAPE, [0, 1], 5)
            with open(path, "rb") as f:
                r = requests.put(
                    f"{server.url}/datastore/label",
                    params={"image": image},
                    data={"params": json.dumps({"annotated_slices": [0, 1]})},
                    files={"label": (path.name, f)},
                )
            assert r.status_code == 200, r.text
        r = requests.post(f"{server.url}/train/qunet", json={"max_epochs": 100000, "train_batch_size": 4})
        assert r.status_code == 200, r.text
        wait_for(lambda: model.exists(), 240, "a published model", poll=0.2)  # training runs and publishes

        storm = Storm(server.url, tmp_path)
        storm.start()
        wait_for(lambda: len(storm.done) >= 5, 120, "labels saved", poll=0.02)
        assert requests.post(f"{server.url}/scoring/qunet_quality", timeout=30).status_code == 200
        seen = wait_for(lambda: quality_on_disk(studies), 240, "quality scoring under way", poll=0.02)
        assert len(seen) < BIG + len(SMALL), "scoring finished before the kill: make it slower"
        assert storm.is_alive() and not storm.failed, storm.failed
        assert requests.get(f"{server.url}/train/", timeout=10).json()["status"] == "RUNNING"
    finally:
        server.stop(signal.SIGKILL)  # the whole process group: server, scoring and training subprocesses
    storm.stop.set()
    storm.join(60)
    acknowledged, in_flight = list(storm.done), storm.in_flight
    print(
        f"killed with {len(acknowledged)} labels acknowledged, one in flight: {in_flight is not None}; "
        f"{len(seen)} images had quality scores"
    )

    # the files as the kill left them: the JSON parses; the published model and the stats are complete
    before_restart = json.loads((studies / "datastore_v2.json").read_text())
    load_weights(build_network(TINY), str(model))
    stats = Path(server.app_dir, "model", "train_stats.json")
    assert not stats.exists() or json.loads(stats.read_text())

    restarted = LiveServer(studies, workdir, conf=CONF, env=env).start()
    try:
        assert not [p for p in studies.rglob(".tmp-*")], "temporary files left after the restart"
        objects = requests.get(f"{restarted.url}/datastore/", params={"output": "all"}, timeout=30).json()["objects"]
        assert set(objects) == set(before_restart["objects"])

        # every label answered 200 is there: content on its slices, record and annotated slices
        last: dict[tuple[str, int], set[int]] = {(i, k): {5} for i in SMALL for k in (0, 1)}  # (image, slice) -> sizes
        for image, slices, size in acknowledged:
            for k in slices:
                last[(image, k)] = {size}
        if in_flight:  # may or may not have been committed
            for k in in_flight[1]:
                last[(in_flight[0], k)] = last.get((in_flight[0], k), set()) | {in_flight[2]}
        for image in SMALL:
            info = objects[image]["image"]["info"]
            assert (
                "final" in objects[image]["labels"] and "qunet_pending" not in objects[image]["labels"]["final"]["info"]
            )
            annotated = set(info["qunet_annotated"])
            must = {0, 1} | {k for i, slices, _ in acknowledged if i == image for k in slices}
            may = set(in_flight[1]) if in_flight and in_flight[0] == image else set()
            assert must <= annotated <= must | may, (
                f"{image}: annotated slices {sorted(annotated)}, expected {sorted(must)}"
            )
            label = load_label(
                studies / "labels" / "final" / f"{image}.nii.gz", load_stack(studies / f"{image}.nii.gz")
            )
            for (i, k), sizes in last.items():
                if i == image:
                    side = int(label[:, 3, k].sum())  # the square's side on slice k
                    assert side in sizes, f"{image} slice {k}: square of {side}, expected one of {sizes}"

        # quality scores computed before the kill are kept and not recomputed; the rest are scored now
        kept = quality_on_disk(studies)
        assert set(seen) <= set(kept) and len(kept) < BIG + len(SMALL)
        counts = requests.post(f"{restarted.url}/scoring/qunet_quality?run_sync=true", timeout=300).json()
        assert counts == {"scored": BIG + len(SMALL) - len(kept), "skipped": len(kept), "failed": 0}, counts
        after = quality_on_disk(studies)
        assert all(after[k] == v for k, v in kept.items())

        # training starts again from the published model's run
        r = requests.post(
            f"{restarted.url}/train/qunet?run_sync=true", json={"max_epochs": 1, "train_batch_size": 4}, timeout=300
        )
        assert r.status_code == 200, r.text
        assert requests.get(f"{restarted.url}/info/", timeout=30).ok
    finally:
        restarted.stop()


def test_upload_left_by_a_killed_server_is_removed_at_restart(tmp_path):
    """A label upload waiting for the datastore lock when the server is killed: its private folder stays, in the
    app's model folder (not the system's temporary folder), and the next start removes it."""
    studies = tmp_path / "studies"
    studies.mkdir()
    write_stack(studies / "lab0.nii.gz", SMALL_SHAPE, seed=10)
    server = LiveServer(studies, tmp_path, conf=CONF).start()
    uploads = Path(server.app_dir, "model", "uploads")
    label = tmp_path / "label.nii.gz"
    write_label(label, SMALL_SHAPE, [3], 5)

    def submit() -> None:
        with contextlib.suppress(requests.RequestException), open(label, "rb") as f:  # the server is killed
            requests.put(
                f"{server.url}/datastore/label",
                params={"image": "lab0"},
                files={"label": (label.name, f)},
                data={"params": json.dumps({"annotated_slices": [3]})},
                timeout=120,
            )

    try:
        with FileLock(studies / ".lock"):  # the datastore's lock: the save waits with its upload received
            saving = threading.Thread(target=submit, daemon=True)
            saving.start()
            received = wait_for(lambda: list(uploads.glob("*/*")), 60, "the upload received", poll=0.1)
            server.stop(signal.SIGKILL)
    finally:
        server.stop(signal.SIGKILL)
    saving.join(60)
    assert received[0].parent.name.startswith(f"{server.proc.pid}-") and received[0].exists()
    restarted = LiveServer(studies, tmp_path, conf=CONF).start()
    try:
        assert not list(uploads.iterdir()), "the killed server's upload folder is still there"
        objects = requests.get(f"{restarted.url}/datastore/", params={"output": "all"}, timeout=30).json()["objects"]
        assert "final" not in objects["lab0"]["labels"]  # the save never ran
    finally:
        restarted.stop()
