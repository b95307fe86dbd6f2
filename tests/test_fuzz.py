"""Fuzz the REST endpoints the app adds or changes with malformed query, form and body values: never a 5xx,
every 4xx says what is wrong, nothing stored changes, nothing is written outside the studies folder.

In-process (FastAPI's TestClient, monailabel.md §7): the same routes and app code as a live server, hundreds of
requests in seconds. Deterministic: a seeded generator, a bounded number of requests.
"""

import json
import os
import random
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from app_inprocess import app_client
from live_server import records_on_disk
from qunet import build_network
from qunet_bench.synthetic import generate_stack

TINY = (4, 4, 8, 8, 16, 4)
CONF = {"patch_size": "32", "features": ",".join(map(str, TINY))}
AFFINE = np.diag([0.8, 0.8, 4.0, 1.0])
SHAPE = (32, 32, 6)
REQUESTS = 400

STRINGS = [
    "",
    " ",
    ".",
    "..",
    "../",
    "../../etc/passwd",
    "/etc/passwd",
    "/dev/zero",
    "a/b",
    "a\\b",
    "ct1/../ct2",
    "ct1\x00",
    "\x00",
    "%2e%2e%2f",
    "ct1 ",
    "ñandú-ß",
    "x" * 3000,
    "{",
    "null",
    "[]",
    "0",
    "-1",
    "1e309",
    "NaN",
    "true",
    "<script>",
    "'; DROP TABLE images;--",
    "final",
    "original",
    "ct1",
    "ct2",
    "qunet",
]
VALUES = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2,
    3.5,
    1e309,
    -1e309,
    10**30,
    "",
    "x",
    "../x",
    "/etc/passwd",
    [],
    [1, "a"],
    {},
    {"a": [1, {"b": None}]},
    "∞",
    "all",
    [0, 1],
    [-1],
    [10**6],
]
JSON_TEXTS = [
    "",
    "{",
    "}",
    "[]",
    "[1, 2]",
    "5",
    '"text"',
    "null",
    "true",
    '{"a":',
    "{'a': 1}",
    "NaN",
    "\x00",
    "[" * 5000 + "]" * 5000,
    '{"a": ' * 3000 + "1" + "}" * 3000,
    "{}" * 2,
]
INFER_KEYS = [
    "device",
    "batch_size",
    "logging",
    "result_extension",
    "result_dtype",
    "result_compress",
    "skip_writer",
    "save_label",
    "label_tag",
    "image",
    "model",
    "client_id",
    "largest_cc",
    "result_write_to_file",
]
TRAIN_KEYS = [
    "max_epochs",
    "train_batch_size",
    "val_batch_size",
    "learning_rate",
    "augment_range",
    "val_split",
    "early_stop_patience",
    "pretrained",
    "multi_gpu",
    "name",
    "device",
    "dataset",
    "dataloader",
    "tracking",
    "gpus",
    "train_ds",
    "val_ds",
    "tracking_uri",
    "model",
    "run_id",
    "local_rank",
]
LABEL_KEYS = ["annotated_slices", "client_id", "label_info", "ts", "name", "qunet_pending"]
RUN_SYNC = ["true", "1", "yes", "TRUE", "on", "maybe", "2", "[]"]  # never false: no background subprocesses here
ROUTES = [
    ("post", "/activelearning/qunet"),
    ("post", "/activelearning/random"),
    ("post", "/infer/qunet?image=ct1"),
    ("post", "/infer/qunet"),
    ("put", "/datastore/label?image=ct1"),
    ("put", "/datastore/image?image=new"),
    ("put", "/datastore/image/info?image=ct1"),
    ("put", "/datastore/label/info?label=ct1&tag=final"),
    ("post", "/train/qunet?run_sync=true"),
    ("post", "/train/?run_sync=true"),
    ("post", "/scoring/qunet_quality?run_sync=true"),
    ("post", "/scoring/?run_sync=true"),
    ("put", "/model/qunet"),
    ("post", "/datastore/"),
]
CONTENT_TYPES = [
    "multipart/form-data; boundary=zz",
    "multipart/form-data",
    "multipart/form-data; boundary=",
    "application/json",
    "application/x-www-form-urlencoded",
    "text/plain; charset=utf-16",
    "application/octet-stream",
    "image/x-nifti",
    "garbage/;;;",
]


def write(array: np.ndarray, path: Path, affine=AFFINE) -> bytes:
    nib.save(nib.Nifti1Image(array, affine), path)
    return path.read_bytes()


@pytest.fixture(scope="module", autouse=True)
def own_environment():  # noqa: PT004 (also requested by name, for clarity)
    """app_client exports its MONAI Label settings to os.environ: keep them from later live servers."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    studies = root / "studies"
    studies.mkdir()
    for i, name in enumerate(("ct1", "ct2")):
        write(generate_stack("ct", i + 1, SHAPE).image.astype(np.int16), studies / f"{name}.nii.gz")
    torch.manual_seed(0)
    torch.save({"model": build_network(TINY).state_dict()}, root / "pretrained.pt")
    client = app_client(studies, {**CONF, "pretrained_path": str(root / "pretrained.pt")})
    files = {  # uploads that must all be refused (as labels and as new images)
        "empty": b"",
        "text": b"not an image at all",
        "wrong shape": write(np.zeros((32, 32, 5), np.uint8), root / "shape.nii.gz"),
        "wrong geometry": write(np.zeros(SHAPE, np.uint8), root / "geom.nii.gz", np.eye(4)),
        "fractional": write(np.full(SHAPE, 0.5, np.float32), root / "frac.nii.gz"),
        "negative": write(np.full(SHAPE, -3, np.int16), root / "neg.nii.gz"),
        "2D": write(np.zeros(SHAPE[:2], np.uint8), root / "flat.nii.gz"),
        "NaN": write(np.full(SHAPE, np.nan, np.float32), root / "nan.nii.gz"),
    }
    return {"root": root, "studies": studies, "client": client, "files": files}


def fuzz_dict(rng: random.Random, keys: list[str]) -> dict:
    return {k: rng.choice(VALUES + STRINGS[:12]) for k in rng.sample(keys, rng.randint(1, min(4, len(keys))))}


def form_params(rng: random.Random, keys: list[str]) -> str:
    return rng.choice(JSON_TEXTS) if rng.random() < 0.4 else json.dumps(fuzz_dict(rng, keys))


def body(value) -> dict:
    """A JSON body as sent (json.dumps writes Infinity and NaN, which Python's parser takes and httpx refuses)."""
    return {"content": json.dumps(value).encode(), "headers": {"content-type": "application/json"}}


def raw_body(rng: random.Random) -> bytes:
    """Bytes no route can parse as sent: random, not UTF-8, UTF-16 JSON, or a multipart body cut short."""
    part = b'--zz\r\nContent-Disposition: form-data; name="params"\r\n\r\n{"client_id": "a"}\r\n--zz--\r\n'
    upload = b'--zz\r\nContent-Disposition: form-data; name="label"; filename="l.nii.gz"\r\n\r\n\x1f\x8b\x08\x00'
    return rng.choice(
        [
            bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 600))),
            b"\xff\xfe\x00garbage",
            "{}".encode("utf-16"),
            part[: rng.randint(1, len(part) - 1)],
            upload + bytes(rng.getrandbits(8) for _ in range(64)),
            b'{"a": "\xc3"}',
        ]
    )


def make_request(rng: random.Random, files: dict) -> tuple[str, str, dict]:
    """One malformed request to an endpoint the app adds or changes."""
    kind = rng.choice(
        ["label", "label", "infer", "infer", "sample", "scoring", "train", "image", "info", "delete", "raw", "raw"]
    )
    if kind == "raw":
        method, url = rng.choice(ROUTES)
        return method, url, {"content": raw_body(rng), "headers": {"content-type": rng.choice(CONTENT_TYPES)}}
    name = rng.choice(["l.nii.gz", "l.nrrd", "../../l.nii.gz", "l.txt", "l", "l.nii.gz.exe", "a\\..\\l.nii.gz"])
    upload = (name, rng.choice(list(files.values())))
    if kind == "label":
        query = {"image": rng.choice(STRINGS)}
        if rng.random() < 0.5:
            query["tag"] = rng.choice(STRINGS)
        return (
            "put",
            "/datastore/label",
            {"params": query, "data": {"params": form_params(rng, LABEL_KEYS)}, "files": {"label": upload}},
        )
    if kind == "infer":
        query = {"image": rng.choice(STRINGS)}
        if rng.random() < 0.3:
            query["output"] = rng.choice(["image", "json", "all", "dicom_seg", "pdf", ""])
        extra = {"files": {"file": upload}} if rng.random() < 0.2 else {}
        model = rng.choice(["qunet", "qunet", "nope", "..", "qunet%00"])
        return "post", f"/infer/{model}", {"params": query, "data": {"params": form_params(rng, INFER_KEYS)}, **extra}
    if kind == "sample":
        sent = rng.choice([fuzz_dict(rng, ["client_id", "strategy", "slices", "id"]), [1], "x", 5, None])
        return "post", f"/activelearning/{rng.choice(['qunet', 'random', 'nope', '..'])}", body(sent)
    if kind == "scoring":
        method = rng.choice(["qunet_quality", "qunet_disagreement", "nope", "dice"])
        return (
            "post",
            f"/scoring/{method}?run_sync={rng.choice(RUN_SYNC)}",
            body(rng.choice([{}, [], "x", fuzz_dict(rng, ["a"])])),
        )
    if kind == "train":
        sent = rng.choice([fuzz_dict(rng, TRAIN_KEYS), [1], "x", 7])
        return "post", f"/train/{rng.choice(['qunet', 'nope'])}?run_sync={rng.choice(RUN_SYNC)}", body(sent)
    if kind == "image":
        query = {"image": rng.choice(STRINGS)} if rng.random() < 0.8 else {}
        bad = {k: v for k, v in files.items() if k in ("empty", "text", "2D", "NaN")}
        return (
            "put",
            "/datastore/image",
            {
                "params": query,
                "data": {"params": form_params(rng, ["x"])},
                "files": {"file": (name, rng.choice(list(bad.values())))},
            },
        )
    if kind == "info":
        info = rng.choice(JSON_TEXTS + [json.dumps({"qunet_annotated": [1]}), json.dumps({"qunet_served": {}})])
        return "put", "/datastore/image/info", {"params": {"image": rng.choice(STRINGS)}, "data": {"info": info}}
    unknown = [s for s in STRINGS if s not in ("ct1", "ct2")]
    return (
        "delete",
        rng.choice(["/datastore/label", "/datastore/image"]),
        {"params": {"id": rng.choice(unknown), "tag": rng.choice(STRINGS)}},
    )


def snapshot(studies: Path) -> dict:
    objects = json.loads((studies / "datastore_v2.json").read_text())["objects"]
    return {
        "files": sorted(p.relative_to(studies.parent).as_posix() for p in studies.parent.rglob("*")),
        "labels": {k: v["labels"].get("final") for k, v in objects.items()},  # infer may save "original" ones
        "images": sorted(objects),
        "records": {k: records_on_disk(studies).get(k, {}).get("qunet_annotated") for k in objects},
    }


def test_fuzz_endpoints(setup):
    """Every route the app leaves on, with malformed values and with bodies no route can parse: a 4xx with a message,
    never a 5xx, and nothing stored changes."""
    client, studies = setup["client"], setup["studies"]
    assert client.post("/scoring/qunet_quality?run_sync=true").json()["scored"] == 2
    before = snapshot(studies)
    rng = random.Random(20261129)
    seen: dict[int, int] = {}
    for i in range(REQUESTS):
        method, url, kwargs = make_request(rng, setup["files"])
        r = getattr(client, method)(url, **kwargs)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, f"#{i} {method} {url} {str(kwargs)[:300]} -> {r.status_code} {r.text[:300]}"
        if r.status_code >= 400:
            assert r.json().get("detail"), f"#{i} {method} {url}: {r.status_code} without a message"
    print(f"\nFUZZ {REQUESTS} requests, status counts: {dict(sorted(seen.items()))}")
    assert sum(n for s, n in seen.items() if 400 <= s < 500) > REQUESTS / 2  # mostly refused, as they should be

    after = snapshot(studies)
    assert after["labels"] == before["labels"] and after["records"] == before["records"], (
        "a rejected request changed records"
    )
    assert after["images"] == before["images"]
    new_files = set(after["files"]) - set(before["files"])
    # infer's labels, scoring runs' progress and agreement, and the lock every train request takes (nothing to train)
    allowed = (
        "studies/labels/original/",
        "app/model/scoring_",
        "app/model/agreement.json",
        "app/model/qunet-train.lock",
    )
    assert not [f for f in new_files if not f.startswith(allowed)], f"files written: {new_files}"

    # the server still does its job
    assert client.get("/info/").status_code == 200
    sample = client.post("/activelearning/qunet", json={"client_id": "after-fuzz"}).json()
    label = np.zeros(SHAPE, np.uint8)
    label[5:9, 5:9, sample["slices"]] = 1
    r = client.put(
        "/datastore/label",
        params={"image": sample["id"]},
        data={"params": json.dumps({"client_id": "after-fuzz"})},
        files={"label": ("l.nii.gz", write(label, setup["root"] / "ok.nii.gz"))},
    )
    assert r.status_code == 200 and r.json()["annotated_slices"] == sorted(sample["slices"]), r.text


def test_empty_datastore_answers_clearly(tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    client = app_client(studies, CONF)
    assert client.get("/info/").json()["datastore"]["total"] == 0
    for strategy in ("qunet", "random"):  # nothing to annotate: no volume, and why
        answer = client.post(f"/activelearning/{strategy}", json={"client_id": "a"}).json()
        assert answer["id"] == "" and answer["slices"] == [] and answer["message"], answer
    assert client.post("/scoring/qunet_quality?run_sync=true").json() == {"scored": 0, "skipped": 0, "failed": 0}
    assert client.post("/scoring/qunet_disagreement?run_sync=true").json() in (
        {"skipped": "no trained model yet"},
        {"scored": 0, "skipped": 0, "failed": 0},
    )  # (a model in the app dir)
    r = client.post("/train/qunet?run_sync=true", json={"max_epochs": 1})
    assert r.status_code == 409 and r.json()["detail"] == "no annotated slices to train on: submit a label first"
    r = client.post("/infer/qunet", params={"image": "ct1"}, data={"params": "{}"})
    assert r.status_code == 404 and r.json()["detail"] == "unknown image id 'ct1'"
    r = client.put("/datastore/label", params={"image": "ct1"}, files={"label": ("l.nii.gz", b"x")})
    assert r.status_code == 404 and "unknown image id" in r.json()["detail"]
    assert client.get("/datastore/", params={"output": "all"}).json()["objects"] == {}


def test_label_values_must_name_an_app_label(tmp_path, own_environment):
    """With several labels, value i is the i-th label: a value beyond them is refused (with one label any non-zero
    value is that label, as 3D Slicer may number segments from 2)."""
    studies = tmp_path / "studies"
    studies.mkdir()
    write(generate_stack("ct", 1, SHAPE).image.astype(np.int16), studies / "ct1.nii.gz")
    client = app_client(studies, {**CONF, "labels": "cyst,fluid"})
    for value, status in ((3, 422), (2, 200)):
        label = np.zeros(SHAPE, np.uint8)
        label[4:8, 4:8, 2] = value
        r = client.put(
            "/datastore/label",
            params={"image": "ct1"},
            files={"label": ("l.nii.gz", write(label, tmp_path / f"v{value}.nii.gz"))},
        )
        assert r.status_code == status, r.text
    assert (
        "values must be 0 (background) to 2"
        in client.put(
            "/datastore/label",
            params={"image": "ct1"},
            files={"label": ("l.nii.gz", (tmp_path / "v3.nii.gz").read_bytes())},
        ).json()["detail"]
    )
