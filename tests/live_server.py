"""Start a real `monailabel start_server` for tests, on 127.0.0.1 and a free port, as a user would."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import requests
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "apps" / "qunet"
SAMPLES = ROOT / "sample-data"  # read-only here: tests copy what they change
TRUTH = SAMPLES / "ground-truth"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """A monailabel server process over its own copy of the app (so model files stay per test)."""

    def __init__(self, studies: Path, workdir: Path, conf: dict[str, str] | None = None, env: dict[str, str] | None = None):
        self.studies = studies
        self.app_dir = workdir / "app"
        if not self.app_dir.exists():
            shutil.copytree(APP, self.app_dir, ignore=shutil.ignore_patterns("model", "logs", "bin", "__pycache__"))
        self.conf = conf or {}
        self.env = env or {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"server-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 300) -> "LiveServer":
        cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(self.app_dir),
               "--studies", str(self.studies), "--host", "127.0.0.1", "--port", str(self.port)]
        for k, v in self.conf.items():
            cmd += ["--conf", k, str(v)]
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("MONAI_LABEL_")}  # in-process tests set them
        tmp = self.app_dir.parent / "tmp"  # what the server leaves in its temporary folder stays with the test
        tmp.mkdir(exist_ok=True)
        env = {**inherited, "TMPDIR": str(tmp), "MONAI_LABEL_TRACKING_ENABLED": "false",
               "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
               "OMP_NUM_THREADS": "1",  # the server and its scoring/training subprocesses share 2 cores
               "MONAI_LABEL_SESSION_PATH": str(self.app_dir / "sessions"), **self.env}
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, env=env,
                                     cwd=self.app_dir.parent, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if requests.get(f"{self.url}/info/", timeout=2).ok:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        self.stop()  # the fixture that called start() never gets to stop it
        raise TimeoutError(f"server did not answer in {timeout} s:\n{self.tail()}")

    def stop(self, sig: int = 15) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(30)

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""

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
