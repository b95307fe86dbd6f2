"""Nothing is left in the system's temporary folder by a start or any request: the server uses its own folder
(qunet_app.server.tempfolder), removes it when it stops, and a later start removes a killed server's."""

import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import requests
import torch

from hostile_files import CONF, SHAPE, TINY, nifti
from live_server import APP, LiveServer, wait_for
from qunet import build_network
from qunet_bench.synthetic import generate_stack

sys.path.insert(0, str(APP))
from qunet_app.server.tempfolder import COMPILER_CACHE, STALE_SECONDS, sweep  # noqa: E402


def _studies(root: Path) -> Path:
    studies = root / "studies"
    studies.mkdir(parents=True)
    for i in range(2):
        nifti(generate_stack("ct", i + 1, SHAPE).image.astype(np.int16), studies / f"ct{i + 1}.nii.gz")
    torch.manual_seed(0)
    torch.save({"model": build_network(TINY).state_dict()}, root / "pretrained.pt")
    return studies


def _own_folders(server: LiveServer) -> list[str]:
    """The servers' folders in the app's temporary folder (the compiler's cache aside)."""
    root = Path(server.app_dir) / "model" / "tmp"
    return sorted(set(os.listdir(root)) - {COMPILER_CACHE}) if root.exists() else []


def test_start_and_requests_leave_nothing_in_the_system_temp_folder(tmp_path):
    studies = _studies(tmp_path)
    system_tmp = tmp_path / "tmp"  # the server's TMPDIR (qunet_bench.server)
    server = LiveServer(
        studies,
        tmp_path,
        conf={**CONF, "pretrained_path": str(tmp_path / "pretrained.pt")},
        env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "true"},
    ).start()
    try:
        assert os.listdir(system_tmp) == [], "the launcher's logging configuration is removed at start"
        assert _own_folders(server) == [str(server.proc.pid)]
        url = server.url
        assert requests.post(f"{url}/activelearning/qunet", json={"client_id": "a"}, timeout=120).ok
        label = np.zeros(SHAPE, np.uint8)
        label[10:20, 10:20, 3] = 1
        path = nifti(label, tmp_path / "label.nii.gz")
        with open(path, "rb") as f:
            r = requests.put(
                f"{url}/datastore/label",
                params={"image": "ct1"},
                files={"label": ("l.nii.gz", f)},
                data={"params": '{"annotated_slices": [3]}'},
                timeout=120,
            )
        assert r.ok, r.text
        bad = requests.put(
            f"{url}/datastore/label",
            params={"image": "ct2"},
            timeout=60,
            files={"label": ("l.nii.gz", b"not an image")},
        )
        assert bad.status_code == 422, bad.text
        raw = requests.put(
            f"{url}/datastore/label",
            params={"image": "ct2"},
            timeout=120,
            files={"label": ("label.bin", label.tobytes(order="F"))},
        )  # OHIF's, for DICOMweb only
        assert raw.status_code == 422, raw.text
        for output in ("image", "json"):
            r = requests.post(f"{url}/infer/qunet", params={"image": "ct2", "output": output}, timeout=300)
            assert r.ok, r.text
        with open(path, "rb") as f:
            r = requests.post(
                f"{url}/infer/qunet", params={"output": "image"}, files={"file": ("x.nii.gz", f)}, timeout=300
            )
        assert r.ok, r.text
        time.sleep(1)  # MONAI Label removes an answer's file in a background task after sending it
        assert os.listdir(system_tmp) == []
    finally:
        server.stop()
    assert os.listdir(system_tmp) == []
    own = Path(server.app_dir) / "model" / "tmp" / str(server.proc.pid)
    assert list(own.rglob("*")) == [], "every answer's files are removed once sent"


def test_a_killed_servers_folder_is_removed_by_the_next_start(tmp_path):
    studies = _studies(tmp_path)
    conf = {**CONF, "pretrained_path": str(tmp_path / "pretrained.pt")}
    first = LiveServer(studies, tmp_path, conf=conf).start()
    killed = str(first.proc.pid)
    (Path(first.app_dir) / "model" / "tmp" / killed / "left.nii.gz").write_bytes(b"left by a request")
    first.stop(signal.SIGKILL)
    assert _own_folders(first) == [killed]
    second = LiveServer(studies, tmp_path, conf=conf).start()
    try:
        wait_for(lambda: _own_folders(second) == [str(second.proc.pid)], 30, "only the running server's folder")
    finally:
        second.stop()


def test_sweep_removes_only_what_is_stale(tmp_path):
    old, new, old_dir = tmp_path / "old.json", tmp_path / "new.nii.gz", tmp_path / "conversion"
    for p in (old, new):
        p.write_bytes(b"x")
    old_dir.mkdir()
    (old_dir / "part").write_bytes(b"x")
    past = time.time() - STALE_SECONDS - 10
    for p in (old, old_dir):
        os.utime(p, (past, past))
    sweep(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["new.nii.gz"]
