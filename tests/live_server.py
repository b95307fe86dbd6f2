"""Start a real `monailabel start_server` for tests, on 127.0.0.1 and a free port, as a user would."""

import time
from pathlib import Path

import numpy as np
import requests
import SimpleITK as sitk

from qunet_bench.server import APP, REPO as ROOT
from qunet_bench.server import Server

SAMPLES = ROOT / "sample-data"  # read-only here: tests copy what they change
TRUTH = SAMPLES / "ground-truth"


class LiveServer(Server):
    """The project's live server (qunet_bench.server) over its own copy of the app (so model files stay per
    test), with one torch thread: the server and its scoring and training subprocesses share the machine's cores."""

    def __init__(
        self, studies: Path | str, workdir: Path, conf: dict[str, str] | None = None, env: dict[str, str] | None = None
    ):
        super().__init__(studies, workdir, conf, {"OMP_NUM_THREADS": "1", **(env or {})})

    def image_info(self, image_id: str) -> dict:
        """The image's datastore record (`/datastore/image/info`), the app's records included."""
        r = requests.get(f"{self.url}/datastore/image/info", params={"image": image_id}, timeout=30)
        assert r.ok, r.text
        return r.json()


def records_on_disk(studies: Path) -> dict[str, dict]:
    """The app's per-image records as a restarted server would read them from the studies folder's SQLite file."""
    import json
    import sqlite3

    path = Path(studies) / "qunet_records.sqlite"
    if not path.exists():
        return {}
    db = sqlite3.connect(path, timeout=60)
    try:
        rows = db.execute("SELECT image, key, value FROM records WHERE value IS NOT NULL").fetchall()
    finally:
        db.close()
    found: dict[str, dict] = {}
    for image, key, value in rows:
        found.setdefault(image, {})[key] = json.loads(value)
    return found


def wait_for(predicate, timeout: float, what: str, poll: float = 1.0):
    """Poll until `predicate()` is truthy and return it; TimeoutError naming `what` and the last value otherwise."""
    deadline = time.time() + timeout
    value = None
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"{what}: still {value!r} after {timeout} s")


def draw_truth(truth_file: Path, image_file: Path, slices: list[int], out: Path) -> np.ndarray:
    """What an annotator draws: the ground truth on `slices` only, saved to `out` in the geometry of the image as
    the server handed it out. Returns the drawing as (X, Y, Z), as qunet.io reads it."""
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(truth_file)))  # (Z, Y, X)
    drawn = np.zeros_like(truth, dtype=np.uint8)
    drawn[slices] = truth[slices] > 0
    label = sitk.GetImageFromArray(drawn)
    label.CopyInformation(sitk.ReadImage(str(image_file)))
    sitk.WriteImage(label, str(out))
    return drawn.transpose(2, 1, 0)
