"""Hostile file headers and datastore records: seeded mutations of label headers against a live server, and
journal entries of interrupted saves that the app did not write (issue 11)."""

import json
import random
import struct

import nibabel as nib
import numpy as np
import requests

from hostile_files import (
    AFFINE,
    MEMORY_BOUND,
    SHAPE,
    deflate,
    disk_state,
    mha_bytes,
    nifti,
    nrrd_bytes,
    peak_rss,  # noqa: F401
    server,
    setup,
)  # (fixtures)
from live_server import APP
from qunet.io import load_label, load_stack
from qunet_bench.synthetic import generate_stack


def test_fuzzed_upload_headers(setup, server, tmp_path):
    """Seeded mutations of NIfTI, NRRD and MetaImage label headers: never a 5xx, a refusal changes nothing, an
    accepted label reads back on the image's grid, and memory stays bounded."""
    rng = random.Random(20261201)
    image = load_stack(setup["studies"] / "ct1.nii.gz")
    label = np.zeros(SHAPE, np.uint8)
    label[5:9, 5:9, 2] = 1
    raw = np.ascontiguousarray(label.transpose(2, 1, 0)).tobytes()  # file order: x fastest
    ints = ["0", "-1", "1", "3", "2", "48", "10", "4096", "2147483647", "99999999999", "x", ""]
    nrrd_fields = {
        "type": ["uint8", "int16", "float", "double", "block", "weird"],
        "dimension": ["2", "3", "4", "0", "-1", "x"],
        "sizes": ["48 48 10", "48 48", "4800 4800 1000", "0 48 10", "-1 48 10", "48 48 10 1", "a b c"],
        "encoding": ["raw", "gzip", "bzip2", "ascii", "hex", "none"],
        "endian": ["little", "big", "middle"],
        "byte skip": ints,
        "line skip": ints,
        "data file": ["/etc/hostname", "LIST", "x%03d.raw 1 3 1"],
        "space directions": ["(-0.8,0,0) (0,-0.8,0) (0,0,4)", "none", "(1,0) (0,1)", "garbage"],
        "space origin": ["(0,0,0)", "(1,2)", "none"],
    }
    meta_fields = {
        "NDims": ints,
        "DimSize": ["48 48 10", "48 48", "4800 4800 1000", "0 0 0", "48 48 x"],
        "ElementType": ["MET_UCHAR", "MET_FLOAT", "MET_DOUBLE", "MET_FLOAT_ARRAY", "MET_NONE", "x"],
        "ElementNumberOfChannels": ints,
        "CompressedData": ["True", "False", "maybe"],
        "CompressedDataSize": ints,
        "HeaderSize": ints,
        "BinaryData": ["True", "False"],
        "ElementDataFile": ["LOCAL", "local", "/etc/hostname", "LIST", "x%d.raw 1 3 1"],
    }
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
            block[offset : offset + struct.calcsize(fmt)] = struct.pack(
                fmt, rng.choice(values["f" if fmt == "<f" else "i"])
            )
        if changes and rng.random() < 0.2:
            block[344:348] = rng.choice([b"ni1\0", b"n+2\0", b"xxxx"])
        data = bytes(block) + bytes(4) + label.transpose(2, 1, 0).tobytes()
        return ("l.nii.gz", deflate(data)) if compress else ("l.nii", data)

    for name, data in (
        ("l.nii", nifti(label, tmp_path / "w.nii").read_bytes()),
        ("l.nrrd", nrrd_bytes({}, raw)),
        ("l.mha", mha_bytes({}, raw)),
        ("l.nrrd", nrrd_bytes({"encoding": "gzip"}, deflate(raw))),
        ("l.mha", mha_bytes({"CompressedData": "True"}, deflate(raw, 0, 15))),
    ):
        r = requests.put(
            f"{server.url}/datastore/label", params={"image": "ct1"}, files={"label": (name, data)}, timeout=60
        )
        assert r.status_code == 200, (name, r.text)  # every reader loaded before the peak RSS is taken
    peak, before, seen = peak_rss(server), disk_state(setup, server), {}
    for i in range(150):
        name, data = mutated()
        r = requests.put(
            f"{server.url}/datastore/label", params={"image": "ct1"}, files={"label": (name, data)}, timeout=60
        )
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
    from qunet_app.datastore.local import QUNetDatastore

    studies = tmp_path / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for i, name in enumerate(("ct1", "ct2")):
        nifti(generate_stack("ct", i + 1, SHAPE).image.astype(np.int16), studies / f"{name}.nii.gz")
        nifti(np.full(SHAPE, i + 1, np.uint8), studies / "labels" / "final" / f"{name}.nii.gz")
    QUNetDatastore(str(studies), extensions=["*.nii.gz"], auto_reload=False)
    labels = {p.name: p.read_bytes() for p in (studies / "labels" / "final").iterdir()}
    for pending in (
        {"tmp": "ct2.nii.gz", "stale": None},
        {"tmp": ".tmp-abcdefgh", "stale": "ct2.nii.gz"},
        {"tmp": "../../ct2.nii.gz"},
        "x",
        {"tmp": ".tmp-abcdefgh", "stale": "../ct2.nii.gz"},
    ):
        store = json.loads((studies / "datastore_v2.json").read_text())
        store["objects"]["ct1"]["labels"]["final"]["info"]["qunet_pending"] = pending
        (studies / "datastore_v2.json").write_text(json.dumps(store))
        reopened = QUNetDatastore(str(studies), extensions=["*.nii.gz"], auto_reload=False)  # what a restart runs
        assert {p.name: p.read_bytes() for p in (studies / "labels" / "final").iterdir()} == labels, pending
        assert "qunet_pending" not in reopened.get_label_info("ct1", "final")
        assert reopened.get_label_by_image_id("ct2", "final")
