"""Bad input on a live server: clear 4xx answers naming the problem, the server keeps serving, nothing stored changes.

One `monailabel start_server` over a studies folder holding good stacks next to a truncated, an empty, a 2D, a
multi-channel, a 4D, a NaN, an Inf and a non-image file, and stacks with constant slices.
"""

import gzip
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
import SimpleITK as sitk
import torch
from monailabel.client import MONAILabelClient

from live_server import LiveServer
from qunet import build_network
from qunet_bench.synthetic import generate_stack

TINY = (4, 4, 8, 8, 16, 4)
CONF = {"patch_size": "32", "features": ",".join(map(str, TINY)), "slices_per_sample": "3"}
AFFINE = np.diag([0.8, 0.8, 4.0, 1.0])
SHAPE = (48, 48, 10)
GOOD = ("ct1", "ct2", "someflat")  # someflat: slices 2 and 7 constant
BLANK = "blank"  # readable but constant everywhere: scored, never served
BAD = {  # image id -> words the error must contain
    "truncated": "not a readable image",
    "zerobytes": "empty file",
    "flat2d": "3D stack",
    "rgb": "3D stack",
    "fourd": "3D stack",
    "withnan": "NaN",
    "withinf": "infinite",
    "notanimage": "not a readable image",
}


def nifti(array: np.ndarray, path: Path, affine=AFFINE) -> Path:
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("robust")
    studies = root / "studies"
    studies.mkdir()
    for i, name in enumerate(GOOD):
        image = generate_stack("ct", i + 1, SHAPE).image.astype(np.float32)
        if name == "someflat":
            image[:, :, 2] = 7.0
            image[:, :, 7] = 0.0
        nifti(image, studies / f"{name}.nii.gz")
    nifti(np.zeros(SHAPE, np.int16), studies / f"{BLANK}.nii.gz")
    data = (studies / "ct1.nii.gz").read_bytes()
    (studies / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    (studies / "zerobytes.nii.gz").write_bytes(b"")
    nifti(np.ones(SHAPE[:2], np.float32), studies / "flat2d.nii.gz")
    rgb = sitk.GetImageFromArray(np.ones((SHAPE[2], *SHAPE[:2], 3), np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(studies / "rgb.nii.gz"))
    nifti(np.ones((*SHAPE, 3), np.float32), studies / "fourd.nii.gz")
    for name, value in (("withnan", np.nan), ("withinf", np.inf)):
        image = generate_stack("ct", 9, SHAPE).image.astype(np.float32)
        image[3, 4, 5] = value
        nifti(image, studies / f"{name}.nii.gz")
    (studies / "notanimage.nrrd").write_bytes(gzip.compress(b"just text"))
    return studies


@pytest.fixture(scope="module")
def server(folder):
    # scoring only when asked (not after every Next sample): the same code, fewer subprocess runs to wait for
    pretrained = folder.parent / "pretrained.pt"  # absent at first; the model test puts unusable weights there
    srv = LiveServer(
        folder,
        folder.parent,
        conf={**CONF, "pretrained_path": str(pretrained)},
        env={
            "MONAI_LABEL_AUTO_UPDATE_SCORING": "false",
            "MONAI_LABEL_DATASTORE_AUTO_RELOAD": "true",
            "OMP_NUM_THREADS": "1",
        },
    ).start()
    yield srv
    srv.stop()
    print(srv.tail(20))


def score(server, method: str, timeout: float = 300) -> requests.Response:
    """POST /scoring/<method>?run_sync=true once no background scoring runs (MONAI Label answers 429 meanwhile)."""
    deadline = time.time() + timeout
    while time.time() < deadline:  # a queued run counts once it started: wait for the last one to end
        last = requests.get(f"{server.url}/scoring/", timeout=30)
        if last.status_code == 404 or last.json()["status"] in ("DONE", "ERROR", "STOPPED"):
            break
        time.sleep(0.5)
    while True:
        r = requests.post(f"{server.url}/scoring/{method}?run_sync=true", timeout=timeout)
        if r.status_code != 429 or time.time() > deadline:
            return r
        time.sleep(0.5)


def info(server, image_id: str) -> dict:
    return requests.get(f"{server.url}/datastore/image/info", params={"image": image_id}, timeout=30).json()


def stored_state(folder: Path, server) -> dict:
    """Everything a bad request must leave alone: label files, label records, annotated slices, the folder tree."""
    objects = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=30).json()["objects"]
    return {
        "labels": {
            p.relative_to(folder).as_posix(): p.read_bytes() for p in (folder / "labels").rglob("*") if p.is_file()
        },
        "records": {k: (v["labels"], v["image"]["info"].get("qunet_annotated")) for k, v in objects.items()},
        "tree": sorted(
            p.relative_to(folder.parent).as_posix()
            for p in folder.parent.rglob("*")
            if p.relative_to(folder.parent).parts[0] != "app" and not p.name.startswith(("server-", ".tmp-"))
        ),
    }


def test_bad_images_are_reported_and_good_ones_served(server, folder, tmp_path):
    assert requests.get(f"{server.url}/info/", timeout=30).json()["datastore"]["total"] == len(GOOD) + 1 + len(BAD)
    # scoring in the background (a subprocess, as at start-up) gets through the bad images to the good ones
    assert requests.post(f"{server.url}/scoring/qunet_quality", timeout=30).status_code == 200
    counts = score(server, "qunet_quality").json()  # once that has run: nothing new, bad ones not read again
    assert counts == {"scored": 0, "skipped": len(GOOD) + 1, "failed": len(BAD)}, counts
    for image_id, words in BAD.items():
        record = info(server, image_id)
        assert words in record["qunet_error"] and "qunet_quality" not in record, (image_id, record)
    log = server.log.read_text(errors="replace")
    assert all(f"cannot score {image_id}" in log for image_id in BAD)
    assert info(server, "someflat")["qunet_quality"]["valid"] == [k not in (2, 7) for k in range(SHAPE[2])]
    assert info(server, BLANK)["qunet_quality"]["initial"] == []

    # Next sample serves good images only, and never a constant slice; clients get disjoint slices while held
    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    served: dict[str, set[int]] = {}
    for i in range(12):
        sample = requests.post(f"{server.url}/activelearning/qunet", json={"client_id": f"c{i}"}, timeout=30).json()
        if not sample["id"]:
            break
        assert sample["id"] in GOOD and sample["slices"], sample
        assert not set(sample["slices"]) & served.get(sample["id"], set())
        served.setdefault(sample["id"], set()).update(sample["slices"])
    assert set(served) == set(GOOD) and not served["someflat"] & {2, 7}
    # a bad image is still a file the client can fetch, and the server still answers everything else
    assert requests.get(f"{server.url}/datastore/image", params={"image": "truncated"}, timeout=30).ok
    assert client.info()["models"]["qunet"]


LABEL_CASES = {  # name -> (file name, content maker, expected status, words in the message)
    "wrong shape": ("l.nii.gz", lambda p: nifti(np.zeros((48, 48, 9), np.uint8), p), 422, "label shape"),
    "wrong geometry": ("l.nii.gz", lambda p: nifti(np.zeros(SHAPE, np.uint8), p, np.eye(4)), 422, "geometry"),
    "fractional values": ("l.nii.gz", lambda p: nifti(np.full(SHAPE, 0.5, np.float32), p), 422, "integers"),
    "negative values": ("l.nii.gz", lambda p: nifti(np.full(SHAPE, -1, np.int16), p), 422, "integers"),
    "values above 255": ("l.nii.gz", lambda p: nifti(np.full(SHAPE, 300, np.int16), p), 422, "integers"),
    "NaN values": ("l.nii.gz", lambda p: nifti(np.full(SHAPE, np.nan, np.float32), p), 422, "integers"),
    "empty file": ("l.nii.gz", lambda p: p.write_bytes(b""), 422, "empty file"),
    "not an image": ("l.nii.gz", lambda p: p.write_bytes(b"<html>not a label</html>"), 422, "not a readable image"),
    "text file type": ("label.txt", lambda p: p.write_bytes(b"1 2 3"), 422, "not a single-file NIfTI"),
    "2D label": ("l.nii.gz", lambda p: nifti(np.zeros(SHAPE[:2], np.uint8), p), 422, "3D stack"),
}


def good_label(path: Path, slices) -> Path:
    label = np.zeros(SHAPE, np.uint8)
    label[10:20, 10:20, list(slices)] = 1
    return nifti(label, path)


def put_label(server, image, path: Path, name: str | None = None, tag: str | None = None, params=None):
    query = {"image": image, **({"tag": tag} if tag is not None else {})}
    with open(path, "rb") as f:
        return requests.put(
            f"{server.url}/datastore/label",
            params=query,
            timeout=60,
            data={"params": params if isinstance(params, str) else json.dumps(params or {})},
            files={"label": (name or path.name, f)},
        )


def test_bad_labels_are_rejected_and_change_nothing(server, folder, tmp_path):
    first = put_label(server, "ct1", good_label(tmp_path / "first.nii.gz", [1]), params={"annotated_slices": [1]})
    assert first.status_code == 200 and first.json()["annotated_slices"] == [1], first.text
    before = stored_state(folder, server)

    for case, (name, make, status, words) in LABEL_CASES.items():
        path = tmp_path / f"{case.replace(' ', '_')}-{name}"
        make(path)
        r = put_label(server, "ct1", path, name=name)
        assert r.status_code == status and words in r.json()["detail"], (case, r.status_code, r.text)
        assert "ct1" in r.json()["detail"]  # the message names the image too

    ok = good_label(tmp_path / "ok.nii.gz", [3])
    for image, name, tag, params, status, words in [
        ("nosuchimage", None, None, None, 404, "unknown image id 'nosuchimage'"),
        ("../ct1", None, None, None, 400, "is not allowed"),  # not one file-name component: not an id
        ("ct1/../ct2", None, None, None, 400, "is not allowed"),
        ("..", None, None, None, 400, "is not allowed"),
        ("", None, None, None, 400, "is not allowed"),
        ("x" * 201, None, None, None, 400, "is not allowed"),
        ("ct1", "../../../escaped.nii.gz", "../../escaped", None, 400, "label tag"),
        ("ct1", None, "final/../../x", None, 400, "label tag"),
        ("ct1", None, "..", None, 400, "label tag"),
        ("ct1", None, None, "{not json", 400, "not valid JSON"),
        ("ct1", None, None, "[1, 2]", 400, "JSON object"),
        ("ct1", None, None, {"annotated_slices": [3, 99]}, 400, "annotated_slices must lie in 0..9"),
        ("ct1", None, None, {"annotated_slices": "some"}, 400, "annotated_slices"),
    ]:
        r = put_label(server, image, ok, name=name, tag=tag, params=params)
        assert r.status_code == status and words in r.json()["detail"], (image, name, tag, params, r.text)
    # a label file name with path separators names only the upload: stored as labels/final/<image id>.nii.gz
    for image_id, bad_id in (("../../escaped", "../../escaped"), ("x/../../y", "x/../../y")):
        r = requests.put(
            f"{server.url}/datastore/image",
            params={"image": bad_id},
            timeout=30,
            files={"file": ("img.nii.gz", (folder / "ct2.nii.gz").read_bytes())},
        )
        assert r.status_code == 400 and "not allowed" in r.json()["detail"], r.text
    r = requests.put(
        f"{server.url}/datastore/image/info", params={"image": "ct1"}, data={"info": '{"qunet_annotated": []}'}
    )
    assert r.status_code == 403 and "qunet_annotated" in r.json()["detail"]
    assert stored_state(folder, server) == before, "a rejected request changed what was stored"

    r = put_label(server, "ct1", ok, name="../../sneaky/label.nii.gz", params={"annotated_slices": [3]})
    assert r.status_code == 200 and r.json()["annotated_slices"] == [1, 3], r.text
    assert sorted(p.name for p in (folder / "labels" / "final").iterdir()) == ["ct1.nii.gz"]
    assert not list(folder.parent.rglob("*escaped*")) and not list(folder.parent.rglob("*sneaky*"))


def label_formats(tmp_path: Path, image: Path, slice_index: int) -> dict[str, Path]:
    """A label of `image`'s grid with lesion on one slice, in each single-file format a client may send."""
    label = np.zeros(SHAPE, np.uint8)
    label[12:20, 14:22, slice_index] = 1
    reference = sitk.ReadImage(str(image))
    drawn = sitk.GetImageFromArray(np.ascontiguousarray(label.transpose(2, 1, 0)))
    drawn.CopyInformation(reference)
    files = {}
    for name, compress in (
        ("l.nii", False),
        ("l.nrrd", True),
        ("l-raw.nrrd", False),
        ("l.mha", True),
        ("l-raw.mha", False),
    ):
        files[name] = tmp_path / name
        sitk.WriteImage(drawn, str(files[name]), useCompression=compress)
    files["NIfTI-2"] = tmp_path / "l2.nii"
    nib.save(nib.Nifti2Image(label, nib.load(image).affine), files["NIfTI-2"])
    return files


def test_every_format_accepted_as_a_first_label_is_accepted_everywhere(server, folder, tmp_path):
    """Issue 39: uploads are decoded once and stored as the app's NIfTI, so a format accepted for a first label is
    also accepted when merged with earlier slices (a NIfTI-2 or raw NRRD label was a 500 there), as an image and as
    infer's input."""
    slices = [5]
    for name, path in label_formats(tmp_path, folder / "ct2.nii.gz", 4).items():
        slices = sorted(set(slices) | {len(slices) % SHAPE[2]})
        r = put_label(server, "ct2", path, params={"annotated_slices": slices})  # merged with the earlier slices
        assert r.status_code == 200 and r.json()["annotated_slices"] == slices, (name, r.text)
    stored = next((folder / "labels" / "final").glob("ct2.*"))
    assert stored.name == "ct2.nii.gz"
    for name, path in label_formats(tmp_path, folder / "ct2.nii.gz", 4).items():
        image_id = f"upload-{name.replace('.', '-')}"
        r = requests.put(
            f"{server.url}/datastore/image",
            params={"image": image_id},
            files={"file": (name, path.read_bytes())},
            timeout=60,
        )
        assert r.status_code == 200 and (folder / f"{image_id}.nii.gz").is_file(), (name, r.text)
        assert requests.delete(f"{server.url}/datastore/image", params={"id": image_id}, timeout=30).ok  # (the
        # module's later tests count the images)
        r = requests.post(
            f"{server.url}/infer/qunet",
            params={"output": "json"},
            timeout=120,
            files={"file": (name, path.read_bytes())},
        )
        # accepted: it reaches the model, which this server does not have yet (a refused file answers 422)
        assert r.status_code == 409 and "no trained model" in r.json()["detail"], (name, r.text[:300])


def test_no_model_then_corrupt_and_incompatible_models(server, folder, tmp_path):
    def infer(image="ct2"):
        return requests.post(
            f"{server.url}/infer/qunet", params={"image": image, "output": "image"}, data={"params": "{}"}, timeout=120
        )

    r = infer()
    assert (
        r.status_code == 409 and r.json()["detail"] == "no trained model yet: train first or set --conf pretrained_path"
    )
    assert score(server, "qunet_disagreement").json() == {"skipped": "no trained model yet"}

    published = Path(server.app_dir, "model", "qunet.pt")
    published.write_bytes(b"\x80\x02 truncated pickle")
    r = infer()
    assert r.status_code == 409 and "not a readable model file" in r.json()["detail"], r.text
    r = score(server, "qunet_disagreement")
    assert r.status_code == 409 and "not a readable model file" in r.json()["detail"], r.text
    sample = requests.post(f"{server.url}/activelearning/qunet", json={"client_id": "m"}, timeout=30)
    assert sample.status_code == 200  # Next sample keeps working on the quality pick

    torch.save({"model": build_network((8, 8, 16, 16, 32, 8)).state_dict()}, published)  # other `features`
    r = infer()
    assert r.status_code == 409 and "do not fit this network" in r.json()["detail"], r.text

    torch.save({"model": build_network(TINY).state_dict()}, published)
    r = infer()
    assert r.status_code == 200 and r.content
    for image_id, words in BAD.items():
        r = infer(image_id)
        assert r.status_code == 422 and words in r.json()["detail"], (image_id, r.text)
    counts = score(server, "qunet_disagreement").json()
    # (a background run queued by Next sample may have scored some with this model already)
    assert counts["scored"] + counts["skipped"] == len(GOOD) + 1 and counts["failed"] == len(BAD), counts
    published.unlink()

    # --conf pretrained_path holding weights of another network: infer and training say so
    pretrained = Path(server.conf["pretrained_path"])
    torch.save({"model": build_network((8, 8, 16, 16, 32, 8)).state_dict()}, pretrained)
    r = infer()
    assert r.status_code == 409 and "do not fit this network" in r.json()["detail"], r.text
    r = requests.post(f"{server.url}/train/qunet?run_sync=true", json={"max_epochs": 1}, timeout=300)
    assert r.status_code == 409 and "pretrained_path cannot be used" in r.json()["detail"], r.text
    pretrained.unlink()


def test_every_slice_annotated_leaves_nothing_to_serve(server, folder, tmp_path):
    for image_id in (*GOOD, BLANK):
        r = put_label(
            server, image_id, good_label(tmp_path / f"{image_id}.nii.gz", []), params={"annotated_slices": "all"}
        )
        assert r.status_code == 200 and r.json()["annotated_slices"] == list(range(SHAPE[2])), r.text
    for client in ("x", "y"):
        r = requests.post(f"{server.url}/activelearning/qunet", json={"client_id": client}, timeout=30)
        assert r.status_code == 200 and r.json()["id"] == "" and r.json()["slices"] == [], r.text
    assert requests.get(f"{server.url}/info/", timeout=30).json()["datastore"]["completed"] == len(GOOD) + 1
