"""Hostile files and the server the security tests aim them at (test_security.py, test_security_files.py): each
module that imports the `setup` and `server` fixtures gets its own studies folder and server."""

import gzip
import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from live_server import LiveServer, records_on_disk
from qunet import build_network
from qunet_bench.synthetic import generate_stack

TINY = (4, 4, 8, 8, 16, 4)
SHAPE = (48, 48, 10)
CAP = 48 * 48 * 12  # --conf max_voxels: the stacks fit, big.nii.gz (48 x 48 x 16) does not
CONF = {
    "patch_size": "32",
    "features": ",".join(map(str, TINY)),
    "max_voxels": str(CAP),
    "hold_seconds": "0",
    "allow_model_upload": "true",
}
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
    head = {
        "type": "uint8",
        "dimension": "3",
        "space": "left-posterior-superior",
        "sizes": " ".join(map(str, SHAPE)),
        "space directions": "(-0.8,0,0) (0,-0.8,0) (0,0,4)",
        "endian": "little",
        "encoding": "raw",
        "space origin": "(0,0,0)",
        **fields,
    }  # the geometry of AFFINE
    return ("NRRD0004\n" + "".join(f"{k}: {v}\n" for k, v in head.items() if v is not None) + "\n").encode() + data


def mha_bytes(fields: dict[str, str], data: bytes = b"") -> bytes:
    head = {
        "ObjectType": "Image",
        "NDims": "3",
        "DimSize": " ".join(map(str, SHAPE)),
        "ElementType": "MET_UCHAR",
        "TransformMatrix": "-1 0 0 0 -1 0 0 0 1",
        "Offset": "0 0 0",
        "ElementSpacing": "0.8 0.8 4",
        **fields,
    }
    if head.get("CompressedData") == "True":
        head.setdefault("CompressedDataSize", str(len(data)))
    head["ElementDataFile"] = head.pop("ElementDataFile", "LOCAL")  # must be the last line
    return "".join(f"{k} = {v}\n" for k, v in head.items() if v is not None).encode() + data


VOXELS = bytes(int(np.prod(SHAPE)))


def _stored_block(data: bytes) -> bytes:
    """A raw deflate block that holds `data` uncompressed (not the last block)."""
    return b"\x00" + len(data).to_bytes(2, "little") + (len(data) ^ 0xFFFF).to_bytes(2, "little") + data


def differential_nrrd(header: bytes, body: bytes, extra_zeros: int) -> bytes:
    """Issue 39's upload: an NRRD `header` (gzip encoding, without its end) ended by a line holding one space, then
    one gzip stream whose first (stored) block holds "\n\n" and the gzip of a valid `body`, then `extra_zeros`
    deflated zeros. A checker that ends the header at the first "\n\n" checks the small embedded stream; pynrrd
    ends it at the space-only line and inflates the whole stream."""
    c = zlib.compressobj(1, zlib.DEFLATED, -15)
    zeros = b"".join(c.compress(bytes(1 << 20)) for _ in range(extra_zeros >> 20)) + c.flush()
    trailer = bytes(8)  # CRC and size: never reached, the inflated size is refused first
    gzip_head = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    return header + b" \n" + gzip_head + _stored_block(b"\n\n" + gzip.compress(body)) + zeros + trailer


def make_studies(root: Path) -> dict:
    """A studies folder that also holds a symlink to a stack outside it, a stack above the voxel cap, an NRRD header
    naming a file outside, and a symlinked label; a folder outside it and the server's temporary folder."""
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


def disk_state(setup, server) -> dict:
    """What a refused request must leave alone, byte for byte."""
    studies, model = setup["studies"], Path(server.app_dir) / "model"
    return {
        "datastore": (studies / "datastore_v2.json").read_bytes(),
        "records": records_on_disk(studies),
        "labels": {
            p.relative_to(studies).as_posix(): p.read_bytes() for p in (studies / "labels").rglob("*") if p.is_file()
        },
        "studies": sorted(os.listdir(studies)),
        "model": sorted(p.relative_to(model).as_posix() for p in model.rglob("*")) if model.exists() else [],
        "tmp": sorted(os.listdir(setup["tmp"])),
    }


def peak_rss(server) -> int:
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) * 1024


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_studies(tmp_path_factory.mktemp("security"))


@pytest.fixture(scope="module")
def server(setup):
    srv = live_server(setup)
    yield srv
    srv.stop()
