"""Hostile clients against a live server (issue 11): every attack answers a 4xx with a message (or meets a switched-off
endpoint), nothing outside the studies folder is read or served, memory stays bounded whatever a header claims,
and nothing on disk changes after a refusal (datastore JSON, labels, studies and model folders, temporary folder).

One server (`server`, model uploads on) over a studies folder that also holds a symlink to a stack outside it, a
stack above the server's voxel cap, an NRRD header naming a file outside, and a symlinked label; the last test
kills it mid-training and restarts it. (Model uploads off by default: tests/test_app_inprocess.py.)
"""

import io
import json
import os
import random
import signal
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import pytest
import requests
import torch
from filelock import FileLock

from live_server import APP, LiveServer, records_on_disk, wait_for
from qunet import build_network
from qunet.io import load_label, load_stack
from qunet.synthetic import generate_stack

TINY = (4, 4, 8, 8, 16, 4)
SHAPE = (48, 48, 10)
CAP = 48 * 48 * 12  # --conf max_voxels: the stacks fit, big.nii.gz (48 x 48 x 16) does not
CONF = {"patch_size": "32", "features": ",".join(map(str, TINY)), "max_voxels": str(CAP), "hold_seconds": "0",
        "allow_model_upload": "true"}
AFFINE = np.diag([0.8, 0.8, 4.0, 1.0])
BOMB = 256 << 20  # zeros appended inside a compressed stream (about 1 MB on the wire)
MEMORY_BOUND = 100 << 20  # the server's peak RSS may grow by less than this through all refused uploads


def nifti(array: np.ndarray, path: Path) -> Path:
    nib.save(nib.Nifti1Image(array, AFFINE), path)
    return path


def deflate(data: bytes, extra_zeros: int = 0, wbits: int = 31) -> bytes:
    """`data` then `extra_zeros` zero bytes in one gzip (wbits 31) or zlib (15) stream."""
    c = zlib.compressobj(1, zlib.DEFLATED, wbits)
    out = [c.compress(data)]
    chunk = bytes(1 << 24)
    for _ in range(extra_zeros // len(chunk)):
        out.append(c.compress(chunk))
    return b"".join(out) + c.flush()


def nifti_bytes(shape=SHAPE, claim=None, magic=b"n+1", extra_zeros=0) -> bytes:
    """A gzipped uint8 NIfTI label of `shape` (its header may claim another shape or be a detached .hdr)."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.uint8)
    header.set_data_shape(claim or shape)
    header.set_data_offset(352)
    block = bytearray(header.binaryblock)
    block[344:347] = magic
    return deflate(bytes(block) + bytes(4) + bytes(int(np.prod(shape))), extra_zeros)


def nrrd_bytes(fields: dict[str, str], data: bytes = b"") -> bytes:
    head = {"type": "uint8", "dimension": "3", "space": "left-posterior-superior", "sizes": " ".join(map(str, SHAPE)),
            "space directions": "(-0.8,0,0) (0,-0.8,0) (0,0,4)", "endian": "little", "encoding": "raw",
            "space origin": "(0,0,0)", **fields}  # the geometry of AFFINE
    return ("NRRD0004\n" + "".join(f"{k}: {v}\n" for k, v in head.items() if v is not None) + "\n").encode() + data


def mha_bytes(fields: dict[str, str], data: bytes = b"") -> bytes:
    head = {"ObjectType": "Image", "NDims": "3", "DimSize": " ".join(map(str, SHAPE)), "ElementType": "MET_UCHAR",
            "TransformMatrix": "-1 0 0 0 -1 0 0 0 1", "Offset": "0 0 0", "ElementSpacing": "0.8 0.8 4", **fields}
    if head.get("CompressedData") == "True":
        head.setdefault("CompressedDataSize", str(len(data)))
    head["ElementDataFile"] = head.pop("ElementDataFile", "LOCAL")  # must be the last line
    return "".join(f"{k} = {v}\n" for k, v in head.items() if v is not None).encode() + data


VOXELS = bytes(int(np.prod(SHAPE)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("security")
    studies, outside, tmp = root / "studies", root / "outside", root / "tmp"
    for folder in (studies, outside, tmp, studies / "labels" / "final"):
        folder.mkdir(parents=True)
    for i, name in enumerate(("ct1", "ct2")):
        nifti(generate_stack("ct", i + 1, SHAPE).image.astype(np.int16), studies / f"{name}.nii.gz")
    secret = nifti(generate_stack("ct", 7, SHAPE).image.astype(np.int16), outside / "secret.nii.gz")
    (outside / "secret.txt").write_bytes(b"SECRET" * 4000)
    os.symlink(secret, studies / "link.nii.gz")
    nifti(generate_stack("ct", 3, (48, 48, 16)).image.astype(np.int16), studies / "big.nii.gz")
    (studies / "detached.nrrd").write_bytes(nrrd_bytes({"data file": str(outside / "secret.txt")}))
    label = np.zeros(SHAPE, np.uint8)
    label[:, :, 4] = 1
    os.symlink(nifti(label, outside / "label.nii.gz"), studies / "labels" / "final" / "ct2.nii.gz")
    torch.manual_seed(0)
    torch.save({"model": build_network(TINY).state_dict()}, root / "pretrained.pt")
    return {"root": root, "studies": studies, "outside": outside, "tmp": tmp}


def live_server(setup) -> LiveServer:
    conf = {**CONF, "pretrained_path": str(setup["root"] / "pretrained.pt")}
    env = {"TMPDIR": str(setup["tmp"]), "MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}
    return LiveServer(setup["studies"], setup["root"], conf=conf, env=env).start()


@pytest.fixture(scope="module")
def server(setup):
    srv = live_server(setup)
    yield srv
    srv.stop()


def disk_state(setup, server) -> dict:
    """What a refused request must leave alone, byte for byte."""
    studies, model = setup["studies"], Path(server.app_dir) / "model"
    return {
        "datastore": (studies / "datastore_v2.json").read_bytes(),
        "records": records_on_disk(studies),
        "labels": {p.relative_to(studies).as_posix(): p.read_bytes() for p in (studies / "labels").rglob("*") if p.is_file()},
        "studies": sorted(os.listdir(studies)),
        "model": sorted(p.relative_to(model).as_posix() for p in model.rglob("*")) if model.exists() else [],
        "tmp": sorted(os.listdir(setup["tmp"])),
    }


def peak_rss(server) -> int:
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) * 1024


@pytest.fixture(scope="module")
def hostile_uploads(setup) -> dict[str, tuple[str, bytes, str]]:
    """name -> (upload file name, bytes, words the refusal must hold)."""
    secret = str(setup["outside"] / "secret.txt")
    return {
        "NRRD naming a server file": ("l.nrrd", nrrd_bytes({"data file": secret}), "separate data file"),
        "NRRD naming it, byte skip -1": ("l.nrrd", nrrd_bytes({"datafile": secret, "byte skip": "-1"}), "separate data file"),
        "NRRD header named .nii.gz": ("l.nii.gz", nrrd_bytes({"data file": secret}), "separate data file"),
        "MetaImage naming a server file": ("l.mha", mha_bytes({"ElementDataFile": secret}), "separate file"),
        "MetaImage header as .mhd": ("l.mhd", mha_bytes({"ElementDataFile": "LIST"}), "separate file"),
        "NIfTI .hdr of a pair": ("l.nii.gz", nifti_bytes(magic=b"ni1"), "separate .img"),
        "NIfTI claiming 2048^3 voxels": ("l.nii.gz", nifti_bytes(claim=(2048, 2048, 2048)), "more than the limit"),
        "NIfTI decompression bomb": ("l.nii.gz", nifti_bytes(extra_zeros=BOMB), "inflates beyond"),
        "NRRD decompression bomb": ("l.nrrd", nrrd_bytes({"encoding": "gzip"}, deflate(VOXELS, BOMB)), "inflates beyond"),
        "MetaImage decompression bomb": ("l.mha", mha_bytes({"CompressedData": "True"}, deflate(VOXELS, BOMB, 15)),
                                         "inflates beyond"),
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


def test_names_checked_in_bytes_and_any_upload_name_is_harmless(setup, server, tmp_path):
    image = (setup["studies"] / "ct2.nii.gz").read_bytes()
    before = disk_state(setup, server)
    for image_id in ("ñ" * 200, "x" * 201, "a/b", ".hidden"):
        r = requests.put(f"{server.url}/datastore/image", params={"image": image_id}, files={"file": ("i.nii.gz", image)})
        assert r.status_code == 400 and "not allowed" in r.json()["detail"], (image_id, r.text)
    assert disk_state(setup, server) == before
    # a label named anything (a 300-character suffix, an upper-case one) is stored as <image id><its format>
    label = np.zeros(SHAPE, np.uint8)
    label[10:20, 10:20, 3] = 1
    data = nifti(label, tmp_path / "l.nii.gz").read_bytes()
    for name in ("L." + "x" * 300, "L.NII.GZ", "label.txt"):
        r = requests.put(f"{server.url}/datastore/label", params={"image": "ct1"}, files={"label": (name, data)},
                         data={"params": json.dumps({"annotated_slices": [3]})}, timeout=60)
        assert r.status_code == 200 and r.json()["annotated_slices"] == [3], (name, r.text)
    stored = sorted(p.name for p in (setup["studies"] / "labels" / "final").iterdir())
    assert stored == ["ct1.nii.gz", "ct2.nii.gz"] and os.listdir(setup["tmp"]) == before["tmp"]


def test_nothing_outside_the_studies_folder_is_listed_served_or_read(setup, server):
    url, tmp_before = server.url, sorted(os.listdir(setup["tmp"]))
    images = requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=30).json()["objects"]
    assert sorted(images) == ["big", "ct1", "ct2", "detached"]  # not the symlink
    assert "final" not in images["ct2"]["labels"]  # nor the symlinked label
    assert requests.get(f"{url}/datastore/image", params={"image": "link"}, timeout=30).status_code == 404
    assert requests.get(f"{url}/datastore/label", params={"label": "ct2", "tag": "final"}, timeout=30).status_code == 404
    stray = setup["tmp"] / "stray.nii.gz"  # a file in the server's temporary folder that no request uploaded
    stray.write_bytes((setup["outside"] / "secret.nii.gz").read_bytes())
    try:
        for image in ("link", str(setup["outside"] / "secret.nii.gz"), str(stray), "../outside/secret"):
            r = requests.post(f"{url}/infer/qunet", params={"image": image, "output": "json"}, timeout=60)
            assert r.status_code == 404 and "unknown image id" in r.json()["detail"], (image, r.text)
        # the uploaded file is the one image a request may name by path ...
        r = requests.post(f"{url}/infer/qunet", params={"output": "json"}, timeout=120,
                          files={"file": ("scan", (setup["studies"] / "ct2.nii.gz").read_bytes())})
        assert r.status_code == 200, r.text
        # ... and params cannot point infer elsewhere
        r = requests.post(f"{url}/infer/qunet", params={"output": "json"}, data={"params": json.dumps({"image": str(stray)})},
                          files={"file": ("scan.nii.gz", (setup["studies"] / "ct2.nii.gz").read_bytes())}, timeout=120)
        assert r.status_code == 404, r.text
    finally:
        stray.unlink()
    wait_for(lambda: sorted(os.listdir(setup["tmp"])) == tmp_before, 10, "uploads and infer results removed", poll=0.5)
    # studies files are read through the same checks: over the voxel cap, or naming a file outside
    r = requests.post(f"{url}/scoring/qunet_quality?run_sync=true", timeout=300)
    assert r.status_code == 200 and r.json()["failed"] == 2, r.text
    info = {i: requests.get(f"{url}/datastore/image/info", params={"image": i}, timeout=30).json() for i in ("big", "detached")}
    assert f"more than the limit of {CAP:,}" in info["big"]["qunet_error"]
    assert "separate data file" in info["detached"]["qunet_error"]
    assert "SECRET" not in server.log.read_text(errors="replace")


def test_app_records_cannot_be_set_by_clients(setup, server, tmp_path):
    label = nifti(np.zeros(SHAPE, np.uint8), tmp_path / "l.nii.gz").read_bytes()
    requests.put(f"{server.url}/datastore/label", params={"image": "ct1"}, files={"label": ("l.nii.gz", label)}, timeout=60)
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
    for path, kind, query in (("/datastore/label", "label", {"image": "ct1"}), ("/datastore/image", "file", {"image": "n"})):
        r = requests.put(server.url + path, params=query, data={"params": json.dumps({"qunet_annotated": [1], "ts": 0})},
                         files={kind: ("l.nii.gz", label if kind == "label" else (setup["studies"] / "ct2.nii.gz").read_bytes())})
        assert r.status_code == 403 and "qunet_annotated, ts" in r.json()["detail"], r.text
    assert disk_state(setup, server) == before


def test_unused_endpoints_off_and_the_rest_checked(setup, server):
    url, before = server.url, disk_state(setup, server)
    for method, path in (("post", "/batch/infer/qunet"), ("post", "/batch/infer/anything"), ("get", "/batch/infer"),
                         ("put", "/session/"), ("get", "/session/x"), ("get", "/datastore/dataset"), ("post", "/reload"),
                         ("post", "/infer/wsi_v2/qunet"), ("get", "/proxy/dicom/qido/studies")):
        r = getattr(requests, method)(url + path, timeout=30)
        assert r.status_code == 404 and r.json()["detail"], (path, r.text)
    for method in ("put", "delete"):
        r = getattr(requests, method)(f"{url}/model/nope", files={"file": ("m.pt", b"x")} if method == "put" else None)
        assert r.status_code == 404 and "no model 'nope'" in r.json()["detail"], (method, r.text)
    checks = [
        ("post", "/train/", {"json": {"qunet": {"max_epochs": "x"}}}, 400, "max_epochs"),
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
        r = requests.post(f"{server.url}/activelearning/qunet", json={"client_id": f"client-{i:03d}-" + "x" * 100}, timeout=30)
        assert r.status_code == 200 and r.json()["id"] in ("ct1", "ct2"), r.text
    kept = records_on_disk(setup["studies"])
    counts = {k: len(v.get("qunet_served", {})) for k, v in kept.items()}
    assert 0 < max(counts.values()) <= 33, counts  # the newest expired ones and the one being written
    assert f"client-059-{'x' * 100}" in kept[r.json()["id"]]["qunet_served"]  # the newest kept


def test_fuzzed_upload_headers(setup, server, tmp_path):
    """Seeded mutations of NIfTI, NRRD and MetaImage label headers: never a 5xx, a refusal changes nothing, an
    accepted label reads back on the image's grid, and memory stays bounded."""
    rng = random.Random(20261201)
    image = load_stack(setup["studies"] / "ct1.nii.gz")
    label = np.zeros(SHAPE, np.uint8)
    label[5:9, 5:9, 2] = 1
    raw = np.ascontiguousarray(label.transpose(2, 1, 0)).tobytes()  # file order: x fastest
    ints = ["0", "-1", "1", "3", "2", "48", "10", "4096", "2147483647", "99999999999", "x", ""]
    nrrd_fields = {"type": ["uint8", "int16", "float", "double", "block", "weird"], "dimension": ["2", "3", "4", "0", "-1", "x"],
                   "sizes": ["48 48 10", "48 48", "4800 4800 1000", "0 48 10", "-1 48 10", "48 48 10 1", "a b c"],
                   "encoding": ["raw", "gzip", "bzip2", "ascii", "hex", "none"], "endian": ["little", "big", "middle"],
                   "byte skip": ints, "line skip": ints, "data file": ["/etc/hostname", "LIST", "x%03d.raw 1 3 1"],
                   "space directions": ["(-0.8,0,0) (0,-0.8,0) (0,0,4)", "none", "(1,0) (0,1)", "garbage"],
                   "space origin": ["(0,0,0)", "(1,2)", "none"]}
    meta_fields = {"NDims": ints, "DimSize": ["48 48 10", "48 48", "4800 4800 1000", "0 0 0", "48 48 x"],
                   "ElementType": ["MET_UCHAR", "MET_FLOAT", "MET_DOUBLE", "MET_FLOAT_ARRAY", "MET_NONE", "x"],
                   "ElementNumberOfChannels": ints, "CompressedData": ["True", "False", "maybe"],
                   "CompressedDataSize": ints, "HeaderSize": ints, "BinaryData": ["True", "False"],
                   "ElementDataFile": ["LOCAL", "local", "/etc/hostname", "LIST", "x%d.raw 1 3 1"]}
    nifti_fields = {0: "<i", 40: "<h", 42: "<h", 44: "<h", 46: "<h", 48: "<h", 70: "<h", 72: "<h", 108: "<f", 112: "<f"}
    values = {"i": [0, -1, 1, 2, 3, 7, 48, 255, 348, 540, 32767, -32768], "f": [0.0, -1.0, 352.0, 1e30, float("nan")]}

    def mutated() -> tuple[str, bytes]:
        kind, compress, changes = rng.choice(["nifti", "nrrd", "mha"]), rng.random() < 0.5, rng.choice([0, 1, 1, 2, 3])
        if kind == "nrrd":
            fields = {k: rng.choice(v) for k, v in rng.sample(sorted(nrrd_fields.items()), changes)}
            if compress:
                fields.setdefault("encoding", "gzip")
            data = deflate(raw, 0) if fields.get("encoding") == "gzip" else raw
            return "l.nrrd", nrrd_bytes(fields, data[: rng.choice([len(data), len(data) // 2])])
        if kind == "mha":
            fields = {k: rng.choice(v) for k, v in rng.sample(sorted(meta_fields.items()), changes)}
            if compress:
                fields.setdefault("CompressedData", "True")
            data = deflate(raw, 0, 15) if fields.get("CompressedData") == "True" else raw
            return "l.mha", mha_bytes(fields, data[: rng.choice([len(data), len(data) // 2])])
        block = bytearray(nib.Nifti1Image(label, AFFINE).header.binaryblock)
        block[108:112] = np.float32(352).tobytes()
        for _ in range(changes):
            offset = rng.choice(sorted(nifti_fields))
            fmt = nifti_fields[offset]
            block[offset: offset + struct.calcsize(fmt)] = struct.pack(fmt, rng.choice(values["f" if fmt == "<f" else "i"]))
        if changes and rng.random() < 0.2:
            block[344:348] = rng.choice([b"ni1\0", b"n+2\0", b"xxxx"])
        data = bytes(block) + bytes(4) + label.transpose(2, 1, 0).tobytes()
        return ("l.nii.gz", deflate(data)) if compress else ("l.nii", data)

    for name, data in (("l.nii", nifti(label, tmp_path / "w.nii").read_bytes()), ("l.nrrd", nrrd_bytes({}, raw)), ("l.mha", mha_bytes({}, raw)),
                       ("l.nrrd", nrrd_bytes({"encoding": "gzip"}, deflate(raw))),
                       ("l.mha", mha_bytes({"CompressedData": "True"}, deflate(raw, 0, 15)))):
        r = requests.put(f"{server.url}/datastore/label", params={"image": "ct1"}, files={"label": (name, data)}, timeout=60)
        assert r.status_code == 200, (name, r.text)  # every reader loaded before the peak RSS is taken
    peak, before, seen = peak_rss(server), disk_state(setup, server), {}
    for i in range(150):
        name, data = mutated()
        r = requests.put(f"{server.url}/datastore/label", params={"image": "ct1"}, files={"label": (name, data)}, timeout=60)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, (i, name, data[:400], r.text[:300])
        if r.status_code == 200:
            stored = requests.get(f"{server.url}/datastore/label", params={"label": "ct1", "tag": "final"}, timeout=30)
            back = tmp_path / stored.headers["content-disposition"].split("filename=")[1].strip('"')  # ct1.<format>
            back.write_bytes(stored.content)
            assert load_label(back, image).shape == SHAPE
            before = disk_state(setup, server)
        else:
            assert r.json()["detail"] and disk_state(setup, server) == before, (i, name, data[:400], r.text[:300])
    print(f"\nFUZZ 150 mutated label headers, status counts: {dict(sorted(seen.items()))}")
    assert seen.get(422, 0) > 75 and seen.get(200, 0) >= 20  # (0 changes: a valid label, 1 in 5)
    assert peak_rss(server) - peak < MEMORY_BOUND


def test_restart_ignores_pending_saves_the_app_did_not_write(tmp_path):
    """The journal entry of an interrupted label save is acted on only if it names a temporary file of ours and a
    stale file of the same image: one naming another image's label would move it over this one."""
    import sys

    if str(APP) not in sys.path:
        sys.path.insert(0, str(APP))
    from lib.datastore import QUNetDatastore

    studies = tmp_path / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for i, name in enumerate(("ct1", "ct2")):
        nifti(generate_stack("ct", i + 1, SHAPE).image.astype(np.int16), studies / f"{name}.nii.gz")
        nifti(np.full(SHAPE, i + 1, np.uint8), studies / "labels" / "final" / f"{name}.nii.gz")
    QUNetDatastore(str(studies), extensions=["*.nii.gz"], auto_reload=False)
    labels = {p.name: p.read_bytes() for p in (studies / "labels" / "final").iterdir()}
    for pending in ({"tmp": "ct2.nii.gz", "stale": None}, {"tmp": ".tmp-abcdefgh", "stale": "ct2.nii.gz"},
                    {"tmp": "../../ct2.nii.gz"}, "x", {"tmp": ".tmp-abcdefgh", "stale": "../ct2.nii.gz"}):
        store = json.loads((studies / "datastore_v2.json").read_text())
        store["objects"]["ct1"]["labels"]["final"]["info"]["qunet_pending"] = pending
        (studies / "datastore_v2.json").write_text(json.dumps(store))
        reopened = QUNetDatastore(str(studies), extensions=["*.nii.gz"], auto_reload=False)  # what a restart runs
        assert {p.name: p.read_bytes() for p in (studies / "labels" / "final").iterdir()} == labels, pending
        assert "qunet_pending" not in reopened.get_label_info("ct1", "final")
        assert reopened.get_label_by_image_id("ct2", "final")


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
    wait_for(lambda: sorted(os.listdir(setup["tmp"])) == before["tmp"], 10, "uploads and infer results removed", poll=0.5)


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
