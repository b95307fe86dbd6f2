"""The bytes that are checked are the bytes that are read (issue 39): `qunet.safe_read.read` decodes every
single-file format with the header parse that checked it, agrees with the readers the app used to rely on (pynrrd,
nibabel, SimpleITK, MONAI's LoadImage) wherever they agree with each other, and refuses what they would read
differently. An upload is rewritten as a NIfTI file (`qunet.io.write_canonical`) that every reader reads alike."""

import gzip
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
from monai.transforms import LoadImage

from hostile_files import differential_nrrd
from qunet import safe_read
from qunet.io import StackError, load_stack, write_canonical

CAP = 64 * 64 * 64
SHAPE = (12, 10, 6)
VALUES = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE, order="F") - 300
DIRECTIONS = "(0,-0.7,0) (0.9,0,0) (0,0,2.5)"  # rotated: axes swapped and flipped
ORIGIN = "(10,-20,30)"


def nrrd_file(
    path: Path,
    header_end: bytes = b"\n",
    encoding: str = "raw",
    space: str = "left-posterior-superior",
    extra: str = "",
) -> Path:
    data = VALUES.astype("<i2").tobytes(order="F")
    fields = (
        f"NRRD0004\ntype: int16\ndimension: 3\nspace: {space}\nsizes: {' '.join(map(str, SHAPE))}\n"
        f"space directions: {DIRECTIONS}\nkinds: domain domain domain\nendian: little\nencoding: {encoding}\n"
        f"space origin: {ORIGIN}\n{extra}"
    )
    path.write_bytes(fields.encode() + header_end + (gzip.compress(data) if encoding == "gzip" else data))
    return path


def nrrd_big_endian(path: Path) -> Path:
    nrrd.write(
        str(path),
        VALUES.astype(">i2"),
        {
            "endian": "big",
            "encoding": "gzip",
            "space": "left-posterior-superior",
            "space directions": np.diag([0.7, 0.9, 2.5]),
            "space origin": np.ones(3),
        },
    )
    return path


def sitk_file(path: Path, compress: bool) -> Path:
    image = sitk.GetImageFromArray(np.ascontiguousarray(VALUES.transpose(2, 1, 0)))
    image.SetSpacing((0.7, 0.9, 2.5))
    image.SetOrigin((10.0, -20.0, 30.0))
    image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(image, str(path), useCompression=compress)
    return path


def nifti2_file(path: Path) -> Path:
    nib.save(nib.Nifti2Image(VALUES, np.diag([0.7, 0.9, 2.5, 1.0])), path)
    return path


def nifti_scaled(path: Path) -> Path:
    image = nib.Nifti1Image(VALUES, np.eye(4))
    image.header.set_slope_inter(0.5, 3.0)
    nib.save(image, path)
    return path


VARIANTS = {
    "NRRD raw": lambda d: nrrd_file(d / "a.nrrd"),
    "NRRD gzip": lambda d: nrrd_file(d / "a.nrrd", encoding="gzip"),
    "NRRD CRLF header": lambda d: (
        Path(d / "a.nrrd").write_bytes(nrrd_file(d / "a.nrrd").read_bytes().replace(b"\n", b"\r\n", 10))
        and d / "a.nrrd"
    ),
    "NRRD RAS space": lambda d: nrrd_file(d / "a.nrrd", space="right-anterior-superior"),
    "NRRD comment line": lambda d: nrrd_file(d / "a.nrrd", extra="# a comment\n"),
    "NRRD big-endian gzip": lambda d: nrrd_big_endian(d / "a.nrrd"),
    "MetaImage raw": lambda d: sitk_file(d / "a.mha", False),
    "MetaImage compressed": lambda d: sitk_file(d / "a.mha", True),
    "NIfTI-1": lambda d: sitk_file(d / "a.nii", False),
    "NIfTI-1 gzip": lambda d: sitk_file(d / "a.nii.gz", True),
    "NIfTI-2": lambda d: nifti2_file(d / "a.nii"),
    "NIfTI scaled": lambda d: nifti_scaled(d / "a.nii.gz"),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_decoder_agrees_with_every_reader_and_canonical_copy_reads_alike(variant, tmp_path):
    path = VARIANTS[variant](tmp_path)
    array, affine, _ = safe_read.read(path, CAP)
    loaded = LoadImage(image_only=True)(str(path))
    assert np.array_equal(array, np.asarray(loaded)) and np.allclose(affine, np.asarray(loaded.affine), atol=1e-5)
    if path.suffix == ".nrrd":
        assert np.array_equal(array, nrrd.read(str(path))[0])
    canonical = tmp_path / "canonical.nii.gz"
    write_canonical(path, canonical)
    by_nibabel = nib.load(canonical)
    assert by_nibabel.get_data_dtype() == array.dtype.newbyteorder("=")  # the file's type, in native byte order
    by_sitk = sitk.ReadImage(str(canonical))
    stack = load_stack(canonical)
    assert np.array_equal(np.asarray(by_nibabel.dataobj), array)
    assert np.array_equal(sitk.GetArrayFromImage(by_sitk).transpose(2, 1, 0), array)
    assert np.array_equal(stack.array, array.astype(np.float32)) and np.allclose(stack.affine, affine, atol=1e-5)
    assert np.allclose(by_nibabel.affine, affine, atol=1e-5)


def differential_nrrd_file(path: Path, bomb: int) -> Path:
    head = (
        f"NRRD0004\ntype: int16\ndimension: 3\nsizes: {' '.join(map(str, SHAPE))}\nencoding: gzip\nendian: little\n"
    ).encode()
    path.write_bytes(differential_nrrd(head, VALUES.astype("<i2").tobytes(order="F"), bomb))
    return path


def test_header_end_differential_is_refused_before_any_reader(tmp_path):
    path = differential_nrrd_file(tmp_path / "diff.nrrd", 16 << 20)
    for decode in (lambda: safe_read.check(path, CAP), lambda: safe_read.read(path, CAP)):
        with pytest.raises(ValueError, match="inflates beyond"):
            decode()
    with pytest.raises(StackError, match="inflates beyond"):
        write_canonical(path, tmp_path / "out.nii.gz")
    assert not (tmp_path / "out.nii.gz").exists()


@pytest.mark.parametrize(
    "case,edit,words",
    [
        (
            "fewer kinds than axes",
            lambda s: s.replace(b"kinds: domain domain domain", b"kinds: domain domain"),
            "kinds",
        ),
        ("NaN direction", lambda s: s.replace(b"(0,-0.7,0)", b"(nan,nan,nan)", 1), "geometry"),
        ("zero direction", lambda s: s.replace(b"(0,-0.7,0)", b"(0,0,0)", 1), "geometry"),
        ("infinite origin", lambda s: s.replace(ORIGIN.encode(), b"(inf,0,0)"), "geometry"),
    ],
)
def test_headers_other_readers_take_differently_are_refused(case, edit, words, tmp_path):
    path = nrrd_file(tmp_path / "a.nrrd")
    path.write_bytes(edit(path.read_bytes()))
    with pytest.raises(ValueError, match=words):
        safe_read.read(path, CAP)
