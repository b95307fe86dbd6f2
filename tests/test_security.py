"""Hostile clients against a live server (issue 11): every attack answers a 4xx with a message (or meets a switched-off
endpoint), nothing outside the studies folder is read or served, memory stays bounded whatever a header claims,
and nothing on disk changes after a refusal (datastore JSON, labels, studies and model folders, temporary folder).

One server (`server`, model uploads on) over hostile_files.make_studies's folder (a symlink to a stack outside it, a
stack above the server's voxel cap, an NRRD header naming a file outside, a symlinked label); the last test kills it
mid-training and restarts it. (Model uploads off by default: tests/test_app_inprocess.py. Fuzzed headers:
tests/test_security_files.py.)
"""

import io
import json
import os
import signal
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
import torch
from filelock import FileLock

from hostile_files import (
    BOMB,
    CAP,
    MEMORY_BOUND,
    SHAPE,
    TINY,
    VOXELS,
    deflate,
    differential_nrrd,  # noqa: F401
    disk_state,
    live_server,
    mha_bytes,
    nifti,
    nifti_bytes,
    nrrd_bytes,
    peak_rss,
    server,
    setup,
)  # (fixtures)
from live_server import records_on_disk, wait_for
from qunet import build_network


@pytest.fixture(scope="module")
def hostile_uploads(setup) -> dict[str, tuple[str, bytes, str]]:
    """name -> (upload file name, bytes, words the refusal must hold)."""
    secret = str(setup["outside"] / "secret.txt")
    return {
        "NRRD naming a server file": ("l.nrrd", nrrd_bytes({"data file": secret}), "separate data file"),
        "NRRD naming it, byte skip -1": (
            "l.nrrd",
            nrrd_bytes({"datafile": secret, "byte skip": "-1"}),
            "separate data file",
        ),
        "NRRD header named .nii.gz": ("l.nii.gz", nrrd_bytes({"data file": secret}), "separate data file"),
        "MetaImage naming a server file": ("l.mha", mha_bytes({"ElementDataFile": secret}), "separate file"),
        "MetaImage header as .mhd": ("l.mhd", mha_bytes({"ElementDataFile": "LIST"}), "separate file"),
        "NIfTI .hdr of a pair": ("l.nii.gz", nifti_bytes(magic=b"ni1"), "separate .img"),
        "NIfTI claiming 2048^3 voxels": ("l.nii.gz", nifti_bytes(claim=(2048, 2048, 2048)), "more than the limit"),
        "NIfTI decompression bomb": ("l.nii.gz", nifti_bytes(extra_zeros=BOMB), "inflates beyond"),
        "NRRD decompression bomb": (
            "l.nrrd",
            nrrd_bytes({"encoding": "gzip"}, deflate(VOXELS, BOMB)),
            "inflates beyond",
        ),
        "NRRD header ended by a space-only line, a bomb behind it": (
            "l.nrrd",
            differential_nrrd(nrrd_bytes({"encoding": "gzip"})[:-1], VOXELS, BOMB),
            "inflates beyond",
        ),
        "NRRD with fewer kinds than axes": ("l.nrrd", nrrd_bytes({"kinds": "domain domain"}, VOXELS), "kinds"),
        "NRRD with NaN directions": (
            "l.nrrd",
            nrrd_bytes({"space directions": "(nan,nan,nan) (0,-0.8,0) (0,0,4)"}, VOXELS),
            "geometry",
        ),
        "NRRD with a zero direction": (
            "l.nrrd",
            nrrd_bytes({"space directions": "(0,0,0) (0,-0.8,0) (0,0,4)"}, VOXELS),
            "geometry",
        ),
        "MetaImage decompression bomb": (
            "l.mha",
            mha_bytes({"CompressedData": "True"}, deflate(VOXELS, BOMB, 15)),
            "inflates beyond",
        ),
        "text": ("l.txt", b"1 2 3", "not a single-file NIfTI"),
        "empty": ("l.nii.gz", b"", "empty file"),
        "300-character suffix, not an image": ("l." + "x" * 300, b"\x00" * 100, "not a single-file NIfTI"),
    }


def test_hostile_uploads_refused_with_nothing_changed_and_memory_bounded(setup, server, hostile_uploads):
    before, peak = disk_state(setup, server), peak_rss(server)
    for case, (name, data, words) in hostile_uploads.items():
        for what, method, url, kwargs in (
            ("label", "put", "/datastore/label", {"params": {"image": "ct1"}, "files": {"label": (name, data)}}),
            ("image", "put", "/datastore/image", {"params": {"image": "new"}, "files": {"file": (name, data)}}),
            ("infer", "post", "/infer/qunet", {"params": {"output": "json"}, "files": {"file": (name, data)}}),
        ):
            r = getattr(requests, method)(server.url + url, timeout=60, **kwargs)
            assert r.status_code == 422 and words in r.json()["detail"], (case, what, r.status_code, r.text[:300])
            assert disk_state(setup, server) == before, (case, what)
    grown = peak_rss(server) - peak
    print(f"\nserver peak RSS grew by {grown / 2**20:.1f} MiB through {3 * len(hostile_uploads)} hostile uploads")
    assert grown < MEMORY_BOUND
    assert "SECRET" not in server.log.read_text(errors="replace")


def test_bodies_ids_and_fields_the_readme_bounds_answer_4xx(setup, server):
    """Issue 39: a body that is not UTF-8 (FastAPI's own 422 failed on it: 500), ids that cannot name a file (400
    wherever an id is taken), a params field over 64 KiB inside an upload's multipart body (413)."""
    before = disk_state(setup, server)
    for route in ("/activelearning/qunet", "/infer/qunet", "/datastore/label?image=ct1", "/train/qunet"):
        r = requests.post(
            server.url + route,
            data=b"\xff\xfe\x00garbage",
            timeout=30,
            headers={"content-type": "multipart/form-data; boundary=zz"},
        )
        assert 400 <= r.status_code < 500, (route, r.status_code, r.text[:200])
    for image_id in ("..", "../ct1", "ct1\x00", "x" * 201, ""):
        for method, route, kwargs in (
            ("get", "/datastore/image", {}),
            ("get", "/datastore/image/info", {}),
            ("put", "/datastore/label", {"files": {"label": ("l.nii.gz", b"x")}}),
            ("get", "/datastore/label", {}),
            ("post", "/infer/qunet", {}),
        ):
            key = "label" if route == "/datastore/label" and method == "get" else "image"
            r = getattr(requests, method)(server.url + route, params={key: image_id}, timeout=30, **kwargs)
            assert r.status_code == 400 and "is not allowed" in r.json()["detail"], (image_id, route, r.text[:200])
    label = nifti_bytes()
    r = requests.put(
        f"{server.url}/datastore/label",
        params={"image": "ct1"},
        timeout=30,
        data={"params": json.dumps({"note": "x" * (70 << 10)})},
        files={"label": ("l.nii.gz", label)},
    )
    assert r.status_code == 413 and "more than" in r.json()["detail"], r.text[:200]
    assert disk_state(setup, server) == before


def test_names_checked_in_bytes_and_any_upload_name_is_harmless(setup, server, tmp_path):
    image = (setup["studies"] / "ct2.nii.gz").read_bytes()
    before = disk_state(setup, server)
    for image_id in ("ñ" * 200, "x" * 201, "a/b", ".hidden"):
        r = requests.put(
            f"{server.url}/datastore/image", params={"image": image_id}, files={"file": ("i.nii.gz", image)}
        )
        assert r.status_code == 400 and "not allowed" in r.json()["detail"], (image_id, r.text)
    assert disk_state(setup, server) == before
    # a label named anything (a 300-character suffix, an upper-case one) is stored as <image id><its format>
    label = np.zeros(SHAPE, np.uint8)
    label[10:20, 10:20, 3] = 1
    data = nifti(label, tmp_path / "l.nii.gz").read_bytes()
    for name in ("L." + "x" * 300, "L.NII.GZ", "label.txt"):
        r = requests.put(
            f"{server.url}/datastore/label",
            params={"image": "ct1"},
            files={"label": (name, data)},
            data={"params": json.dumps({"annotated_slices": [3]})},
            timeout=60,
        )
        assert r.status_code == 200 and r.json()["annotated_slices"] == [3], (name, r.text)
    stored = sorted(p.name for p in (setup["studies"] / "labels" / "final").iterdir())
    assert stored == ["ct1.nii.gz", "ct2.nii.gz"] and os.listdir(setup["tmp"]) == before["tmp"]


def test_nothing_outside_the_studies_folder_is_listed_served_or_read(setup, server):
    url, tmp_before = server.url, sorted(os.listdir(setup["tmp"]))
    images = requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=30).json()["objects"]
    assert sorted(images) == ["big", "ct1", "ct2", "detached"]  # not the symlink
    assert "final" not in images["ct2"]["labels"]  # nor the symlinked label
    assert requests.get(f"{url}/datastore/image", params={"image": "link"}, timeout=30).status_code == 404
    assert (
        requests.get(f"{url}/datastore/label", params={"label": "ct2", "tag": "final"}, timeout=30).status_code == 404
    )
    stray = setup["tmp"] / "stray.nii.gz"  # a file in the server's temporary folder that no request uploaded
    stray.write_bytes((setup["outside"] / "secret.nii.gz").read_bytes())
    try:
        r = requests.post(f"{url}/infer/qunet", params={"image": "link", "output": "json"}, timeout=60)
        assert r.status_code == 404 and "unknown image id" in r.json()["detail"], r.text
        for image in (str(setup["outside"] / "secret.nii.gz"), str(stray), "../outside/secret"):  # not an id: 400
            r = requests.post(f"{url}/infer/qunet", params={"image": image, "output": "json"}, timeout=60)
            assert r.status_code == 400 and "is not allowed" in r.json()["detail"], (image, r.text)
        # the uploaded file is the one image a request may name by path ...
        r = requests.post(
            f"{url}/infer/qunet",
            params={"output": "json"},
            timeout=120,
            files={"file": ("scan", (setup["studies"] / "ct2.nii.gz").read_bytes())},
        )
        assert r.status_code == 200, r.text
        # ... and params cannot point infer elsewhere
        r = requests.post(
            f"{url}/infer/qunet",
            params={"output": "json"},
            data={"params": json.dumps({"image": str(stray)})},
            files={"file": ("scan.nii.gz", (setup["studies"] / "ct2.nii.gz").read_bytes())},
            timeout=120,
        )
        assert r.status_code == 404, r.text
    finally:
        stray.unlink()
    wait_for(lambda: sorted(os.listdir(setup["tmp"])) == tmp_before, 10, "uploads and infer results removed", poll=0.5)
    # studies files are read through the same checks: over the voxel cap, or naming a file outside
    r = requests.post(f"{url}/scoring/qunet_quality?run_sync=true", timeout=300)
    assert r.status_code == 200 and r.json()["failed"] == 2, r.text
    info = {
        i: requests.get(f"{url}/datastore/image/info", params={"image": i}, timeout=30).json()
        for i in ("big", "detached")
    }
    assert f"more than the limit of {CAP:,}" in info["big"]["qunet_error"]
    assert "separate data file" in info["detached"]["qunet_error"]
    assert "SECRET" not in server.log.read_text(errors="replace")


def test_app_records_cannot_be_set_by_clients(setup, server, tmp_path):
    label = nifti(np.zeros(SHAPE, np.uint8), tmp_path / "l.nii.gz").read_bytes()
    requests.put(
        f"{server.url}/datastore/label", params={"image": "ct1"}, files={"label": ("l.nii.gz", label)}, timeout=60
    )
    before = disk_state(setup, server)
    attempts = [
        ("/datastore/label/info", {"label": "ct1", "tag": "final"}, "info", {"qunet_pending": "x"}),
        ("/datastore/label/info", {"label": "ct1", "tag": "final"}, "info", {"qunet_pending": {"tmp": "ct2.nii.gz"}}),
        ("/datastore/updatelabelinfo", {"label": "ct1", "tag": "final"}, "params", {"qunet_pending": "x"}),
        ("/datastore/label/info", {"label": "ct1", "tag": "final"}, "info", {"SeriesInstanceUID": "1.2"}),
        ("/datastore/image/info", {"image": "ct1"}, "info", {"strategy": "x"}),
        ("/datastore/image/info", {"image": "ct1"}, "info", {"qunet_served": {"c": {}}}),
    ]
    for path, query, field, info in attempts:
        r = requests.put(server.url + path, params=query, data={field: json.dumps(info)}, timeout=30)
        assert r.status_code == 403 and next(iter(info)) in r.json()["detail"], (path, info, r.text)
    for path, kind, query in (
        ("/datastore/label", "label", {"image": "ct1"}),
        ("/datastore/image", "file", {"image": "n"}),
    ):
        r = requests.put(
            server.url + path,
            params=query,
            data={"params": json.dumps({"qunet_annotated": [1], "ts": 0})},
            files={kind: ("l.nii.gz", label if kind == "label" else (setup["studies"] / "ct2.nii.gz").read_bytes())},
        )
        assert r.status_code == 403 and "qunet_annotated, ts" in r.json()["detail"], r.text
    assert disk_state(setup, server) == before


def test_unused_endpoints_off_and_the_rest_checked(setup, server):
    url, before = server.url, disk_state(setup, server)
    for method, path in (
        ("post", "/batch/infer/qunet"),
        ("post", "/batch/infer/anything"),
        ("get", "/batch/infer"),
        ("put", "/session/"),
        ("get", "/session/x"),
        ("get", "/datastore/dataset"),
        ("post", "/reload"),
        ("post", "/infer/wsi_v2/qunet"),
        ("get", "/proxy/dicom/qido/studies"),
    ):
        r = getattr(requests, method)(url + path, timeout=30)
        assert r.status_code == 404 and r.json()["detail"], (path, r.text)
    for method in ("put", "delete"):
        r = getattr(requests, method)(f"{url}/model/nope", files={"file": ("m.pt", b"x")} if method == "put" else None)
        assert r.status_code == 404 and "no model 'nope'" in r.json()["detail"], (method, r.text)
    checks = [
        ("post", "/train/", {"json": {"qunet": {"max_epochs": "x"}}}, 400, "max_epochs"),
        ("post", "/train/", {"json": {"qunet": {"seed": [1]}}}, 400, "seed"),
        ("post", "/train/", {"json": {"nope": {}}}, 404, "no trainer 'nope'"),
        ("post", "/train/qunet", {"json": {"model": "other"}}, 400, "params.model"),
        ("post", "/scoring/qunet_quality", {"json": {"method": "qunet_disagreement"}}, 400, "params.method"),
        ("post", "/infer/qunet", {"params": {"image": "ct1", "session_id": "s"}}, 400, "sessions are switched off"),
        ("get", "/datastore/image/info", {"params": {"image": "nope"}}, 404, "unknown image id"),
        ("get", "/datastore/label/info", {"params": {"label": "ct2", "tag": "final"}}, 404, "no label"),
        ("head", "/datastore/image", {"params": {"image": "ct1", "check_sum": "CRC:1"}}, 400, None),
        ("post", "/activelearning/qunet", {"json": {"client_id": "a", "pad": "p" * 200_000}}, 413, None),
    ]
    for method, path, kwargs, status, words in checks:
        r = getattr(requests, method)(url + path, timeout=60, **kwargs)
        assert r.status_code == status and (words is None or words in r.json()["detail"]), (path, kwargs, r.text[:300])
    assert "p" * 1000 not in server.log.read_text(errors="replace")  # the oversized body was never logged
    assert disk_state(setup, server) == before


def test_served_slice_records_are_pruned(setup, server):
    for i in range(60):  # hold_seconds 0: every record is expired when the next one is written
        r = requests.post(
            f"{server.url}/activelearning/qunet", json={"client_id": f"client-{i:03d}-" + "x" * 100}, timeout=30
        )
        assert r.status_code == 200 and r.json()["id"] in ("ct1", "ct2"), r.text
    kept = records_on_disk(setup["studies"])
    counts = {k: len(v.get("qunet_served", {})) for k, v in kept.items()}
    assert 0 < max(counts.values()) <= 33, counts  # the newest expired ones and the one being written
    assert f"client-059-{'x' * 100}" in kept[r.json()["id"]]["qunet_served"]  # the newest kept


def test_model_uploads_checked_and_published_whole(setup, server):
    model_dir = Path(server.app_dir) / "model"
    before = disk_state(setup, server)
    for data in (b"not a model", pickled(build_network((8, 8, 16, 16, 32, 8)))):  # garbage; another network
        r = requests.put(f"{server.url}/model/qunet", files={"file": ("m.pt", data)}, timeout=60)
        assert r.status_code == 422 and "model rejected" in r.json()["detail"], r.text
        assert disk_state(setup, server) == before
    good = pickled(build_network(TINY))
    r = requests.put(f"{server.url}/model/qunet", files={"file": ("m.pt", good)}, timeout=60)
    assert r.status_code == 200 and (model_dir / "qunet.pt").read_bytes() == good, r.text
    assert requests.post(f"{server.url}/infer/qunet", params={"image": "ct2", "output": "json"}, timeout=120).ok
    assert requests.delete(f"{server.url}/model/qunet", timeout=30).status_code == 200
    assert not (model_dir / "qunet.pt").exists()
    wait_for(
        lambda: sorted(os.listdir(setup["tmp"])) == before["tmp"], 10, "uploads and infer results removed", poll=0.5
    )


def test_training_dies_with_the_server_and_a_restart_cleans_up(setup, server):
    """Last in this module: kills the module's server (alone, not its process group) while it trains."""
    model_dir, trainer = Path(server.app_dir) / "model", None
    try:
        assert requests.post(f"{server.url}/train/qunet", json={"max_epochs": 100000}, timeout=30).status_code == 200
        wait_for(lambda: "training on " in server.log.read_text(errors="replace"), 300, "training started")
        trainer = next(p for p in psutil.Process(server.proc.pid).children(recursive=True) if "train" in p.cmdline())
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(30)
        wait_for(lambda: not trainer.is_running() or trainer.status() == psutil.STATUS_ZOMBIE, 15, "the trainer died")
    finally:
        if trainer is not None and trainer.is_running() and trainer.status() != psutil.STATUS_ZOMBIE:
            trainer.kill()  # (only if the test failed)

    # what a killed training leaves is cleared by the next start, and its lock is free
    (model_dir / ".tmp-abcdefgh").write_bytes(b"partial")
    (model_dir / "train_01").mkdir(exist_ok=True)
    (model_dir / "train_01" / "tmpabcd1234").write_bytes(b"partial checkpoint")
    restarted = live_server(setup)
    try:
        assert not (model_dir / ".tmp-abcdefgh").exists() and not (model_dir / "train_01" / "tmpabcd1234").exists()
        with FileLock(str(model_dir / "qunet-train.lock"), timeout=0):  # as while another process trains: no second one
            r = requests.post(f"{restarted.url}/train/qunet?run_sync=true", json={"max_epochs": 1}, timeout=120)
            assert r.status_code == 409 and "a training is running already" in r.json()["detail"], r.text
    finally:
        restarted.stop()


def pickled(network: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save({"model": network.state_dict()}, buffer)
    return buffer.getvalue()
