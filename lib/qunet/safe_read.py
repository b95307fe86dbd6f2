"""Checks and decodes an image file: no file can make a reader read another file, or take more memory than the
voxel cap allows, and the bytes that are checked are the bytes that are decoded (one parser for both).

- The format comes from the bytes, not the name: NIfTI-1/2 with its data inside (.nii, or gzip-compressed .nii.gz),
  NRRD with attached data (raw or gzip encoding, no `data file` field), MetaImage with `ElementDataFile = LOCAL`
  (.mha). A detached header (NIfTI .hdr/.img, .nhdr, .mhd) or a header naming another data file is refused.
- The size comes from the header: its voxel count (all axes and channels) must be within `max_voxels`.
- Compressed data is inflated once, a chunk at a time and never kept, and must give what the header promises: less
  is a truncated file; more (a decompression bomb) is refused as soon as the inflated size passes it.
- `read` decodes the file with the same header parse: voxels (inflated into a buffer no larger than the header
  allows), their type and byte order, the scaling, and the geometry as the affine MONAI's readers give. Other
  readers (pynrrd, ITK, nibabel) end a header or a stream in their own ways: nothing the app serves or stores is
  read by them before `read` has decoded it (uploads are rewritten as NIfTI by qunet.io.write_canonical).

A folder (a DICOM series, which the command line reads) is checked from its first file's header and its file count.
Problems raise ValueError with a message for the user.
"""

import math
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import nibabel as nib
import nrrd
import numpy as np

from qunet import header_geometry

FORMATS = {".nii.gz": "gzip-compressed NIfTI", ".nii": "NIfTI", ".nrrd": "NRRD", ".mha": "MetaImage"}
NOT_AN_IMAGE = "not a readable image: not a single-file NIfTI (.nii, .nii.gz), NRRD (.nrrd) or MetaImage (.mha) file"
CHUNK = 1 << 20
MAX_HEADER = 1 << 20  # bytes: a text header, or a NIfTI header with its extensions
TRAILING = 1 << 16  # bytes an inflated stream may hold beyond the voxel data (padding)
GZIP = b"\x1f\x8b"
NIFTI1_SIZES = ((348).to_bytes(4, "little"), (348).to_bytes(4, "big"))
NIFTI2_SIZES = ((540).to_bytes(4, "little"), (540).to_bytes(4, "big"))
META_KEY = re.compile(rb"\s*[A-Za-z][A-Za-z0-9_]*\s*=")
META_TYPES = {
    "MET_CHAR": "i1",
    "MET_UCHAR": "u1",
    "MET_SHORT": "i2",
    "MET_USHORT": "u2",
    "MET_INT": "i4",
    "MET_UINT": "u4",
    "MET_LONG": "i4",
    "MET_ULONG": "u4",
    "MET_LONG_LONG": "i8",
    "MET_ULONG_LONG": "u8",
    "MET_FLOAT": "f4",
    "MET_DOUBLE": "f8",
}


@dataclass(frozen=True)
class Layout:
    """Where a file's voxel data is, how big it is and what it means, from its header."""

    format: str  # a key of FORMATS
    shape: tuple[int, ...]  # every axis in file order (fastest first), channels included
    dtype: np.dtype  # with the file's byte order
    data_start: int  # offset of the voxel data in the file, or in the inflated stream when compressed
    stream_start: int | None  # where the compressed stream starts in the file; None when not compressed
    affine: np.ndarray  # 4x4 voxel-to-RAS of the spatial axes, as MONAI's LoadImage gives it
    scale: tuple[float, float] = (1.0, 0.0)  # value = stored * slope + intercept (NIfTI)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def voxels(self) -> int:
        return math.prod(self.shape)


def check(path: str | Path, max_voxels: int) -> str:
    """The file's format (a key of FORMATS; "" for a folder) once it is found safe to read; ValueError if not."""
    if os.path.isdir(path):
        _check_folder(str(path), max_voxels)
        return ""
    layout = _checked_layout(path, max_voxels)
    need = layout.data_start + layout.voxels * layout.itemsize
    if layout.stream_start is None:
        _check_size(os.path.getsize(path), need)
    else:
        with open(path, "rb") as f:
            _check_size(_inflate(f, layout.stream_start, need + TRAILING, keep=0)[1], need)
    return layout.format


def _check_size(have: int, need: int) -> None:
    if have > need + TRAILING:
        raise ValueError(f"compressed data inflates beyond the {need:,} bytes its header gives: refused")
    if have < need:
        raise ValueError(f"not a readable image: truncated ({have:,} of {need:,} bytes)")


def read(path: str | Path, max_voxels: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(voxels, affine, format): the voxels in file order (fastest axis first, so a channel axis comes first),
    scaled, in a writable array; the 4x4 voxel-to-RAS affine; the format (a key of FORMATS). What `check` accepts,
    decoded from the same header parse; ValueError
    for anything else. Compressed data is inflated into a buffer of the header's size, never beyond it."""
    layout = _checked_layout(path, max_voxels)
    nbytes = layout.voxels * layout.itemsize
    need = layout.data_start + nbytes
    with open(path, "rb") as f:
        if layout.stream_start is None:
            _check_size(os.fstat(f.fileno()).st_size, need)
            f.seek(layout.data_start)
            data = bytearray(nbytes)
            f.readinto(data)
        else:
            kept, total = _inflate(f, layout.stream_start, need + TRAILING, keep=need)
            _check_size(total, need)
            data = memoryview(kept)[layout.data_start :]
    array = np.frombuffer(data, layout.dtype, layout.voxels).reshape(layout.shape, order="F")
    slope, intercept = layout.scale
    if (slope, intercept) != (1.0, 0.0):
        array = array * np.float32(slope) + np.float32(intercept)
    return array, layout.affine, layout.format


def _checked_layout(path: str | Path, max_voxels: int) -> Layout:
    layout = file_layout(path)
    if any(n < 1 for n in layout.shape):
        raise ValueError(f"not a readable image: bad dimensions {layout.shape} in the header")
    if layout.voxels > max_voxels:
        raise ValueError(
            f"the header gives {' x '.join(map(str, layout.shape))} = {layout.voxels:,} voxels, "
            f"more than the limit of {max_voxels:,}"
        )
    if not np.isfinite(layout.affine).all() or abs(np.linalg.det(layout.affine[:3, :3])) < 1e-12:
        raise ValueError(
            "not a readable image: the header's geometry (spacing, directions, origin) is not finite or has a zero axis"
        )
    return layout


def file_layout(path: str | Path) -> Layout:
    """The format and data layout from the file's header (nothing beyond the header is read); ValueError if the file
    is not a single-file NIfTI, NRRD or MetaImage file."""
    with open(path, "rb") as f:
        head = f.read(MAX_HEADER)
    if not head:
        raise ValueError("empty file")
    if head.startswith(GZIP):
        return _nifti(_inflated_head(path, 540), compressed=True)
    if head[:4] in NIFTI1_SIZES + NIFTI2_SIZES:
        return _nifti(head, compressed=False)
    if head.startswith(b"NRRD000"):
        return _nrrd(head)
    if META_KEY.match(head):
        return _meta(head, os.path.getsize(path))
    raise ValueError(NOT_AN_IMAGE)


def _nifti(block: bytes, compressed: bool) -> Layout:
    if block[:4] in NIFTI1_SIZES and block[344:347] in (b"n+1", b"ni1"):
        header_class, size, magic = nib.Nifti1Header, 348, block[344:347]
    elif block[:4] in NIFTI2_SIZES and block[4:7] in (b"n+2", b"ni2"):
        header_class, size, magic = nib.Nifti2Header, 540, block[4:7]
    else:
        raise ValueError(NOT_AN_IMAGE)
    if magic[1:2] == b"i":
        raise ValueError("a NIfTI header whose data lies in a separate .img file: send one .nii or .nii.gz file")
    try:
        header = header_class(binaryblock=block[:size], check=False)
        shape, dtype, offset = header.get_data_shape(), header.get_data_dtype(), int(header.get_data_offset())
        affine = header.get_best_affine()
        slope, intercept = header.get_slope_inter()
    except Exception as e:  # nibabel raises several kinds for a malformed header
        raise ValueError(f"not a readable image: bad NIfTI header ({_why(e)})") from None
    if not size + 4 <= offset <= MAX_HEADER:
        raise ValueError(f"not a readable image: NIfTI data offset {offset} outside {size + 4}..{MAX_HEADER}")
    scale = (1.0 if slope is None else float(slope), 0.0 if intercept is None else float(intercept))
    return Layout(
        ".nii.gz" if compressed else ".nii",
        tuple(int(n) for n in shape),
        dtype,
        offset,
        0 if compressed else None,
        affine,
        scale,
    )


def _nrrd_header_end(head: bytes) -> int:
    """Where pynrrd's header ends: after the first line that is blank once trailing white space is stripped."""
    pos = 0
    while (line_end := head.find(b"\n", pos)) >= 0:
        line, pos = head[pos:line_end], line_end + 1
        if not line.rstrip():
            return pos
    raise ValueError(f"not a readable image: NRRD header without an end in its first {MAX_HEADER:,} bytes")


def _nrrd(head: bytes) -> Layout:
    end = _nrrd_header_end(head)
    try:
        header = nrrd.read_header(head[:end].decode("latin-1").splitlines())
        dtype = nrrd.reader._determine_datatype(header)  # pynrrd's own type table, with the header's endian
        shape = tuple(int(n) for n in np.atleast_1d(header["sizes"]))
        kinds = header.get("kinds")
        if kinds is not None and len(kinds) != len(shape):
            raise ValueError(f"{len(kinds)} kinds for {len(shape)} axes")
        affine = header_geometry.nrrd_affine(header)
    except Exception as e:  # pynrrd raises NRRDError, KeyError, ValueError, ...
        raise ValueError(f"not a readable image: bad NRRD header ({_why(e)})") from None
    named = header.get("data file", header.get("datafile"))
    if named is not None:
        raise ValueError(
            f"an NRRD header naming a separate data file ({str(named)[:80]!r}): send one .nrrd file holding its data"
        )
    encoding = str(header.get("encoding", "")).lower()
    if encoding not in ("raw", "gzip", "gz"):
        raise ValueError(f"NRRD encoding {encoding!r} is not supported: use raw or gzip")
    skip = int(header.get("byte skip", 0))
    if int(header.get("line skip", 0)) or not 0 <= skip <= MAX_HEADER:
        raise ValueError("NRRD 'line skip', and a 'byte skip' other than 0 to 1 MiB, are not supported")
    if encoding == "raw":
        return Layout(".nrrd", shape, dtype, end + skip, None, affine)
    return Layout(".nrrd", shape, dtype, skip, end, affine)


def _meta(head: bytes, file_size: int) -> Layout:
    fields: dict[str, str] = {}
    pos = 0
    while "ElementDataFile" not in fields:
        line_end = head.find(b"\n", pos)
        if line_end < 0:
            raise ValueError(
                f"not a readable image: MetaImage header without ElementDataFile in its first {MAX_HEADER:,} bytes"
            )
        key, sep, value = head[pos:line_end].decode("latin-1").partition("=")
        pos = line_end + 1
        if sep:
            fields[key.strip()] = value.strip()
        elif key.strip():
            raise ValueError(f"not a readable image: bad MetaImage header line {key.strip()[:40]!r}")
    if fields["ElementDataFile"].lower() != "local":
        raise ValueError(
            f"a MetaImage header whose data lies in a separate file ({fields['ElementDataFile'][:80]!r}): "
            "send one .mha file with ElementDataFile = LOCAL"
        )
    try:
        channels = int(fields.get("ElementNumberOfChannels", 1))
        dims = tuple(int(n) for n in fields["DimSize"].split())
        msb = (fields.get("ElementByteOrderMSB") or fields.get("BinaryDataByteOrderMSB") or "False").lower() == "true"
        dtype = np.dtype(META_TYPES[fields["ElementType"]]).newbyteorder(">" if msb else "<")
        ndims, header_size = int(fields["NDims"]), int(fields.get("HeaderSize") or 0)
        affine = header_geometry.meta_affine(fields, ndims)
    except (KeyError, ValueError) as e:
        raise ValueError(f"not a readable image: bad or missing MetaImage field ({_why(e)})") from None
    if len(dims) != ndims:
        raise ValueError(f"not a readable image: MetaImage DimSize has {len(dims)} values for NDims {ndims}")
    if fields.get("BinaryData", "True").lower() != "true" or header_size:
        raise ValueError("MetaImage text data and HeaderSize are not supported")
    shape = ((channels,) if channels != 1 else ()) + dims  # ITK stores a voxel's channels together
    compressed = fields.get("CompressedData", "False").lower() == "true"
    if compressed and fields.get("CompressedDataSize", "").strip() != str(file_size - pos):
        # ITK allocates what this field says, and reads zeros without an error when it is short or missing
        raise ValueError(
            f"MetaImage CompressedDataSize must be the size of the compressed data ({file_size - pos} bytes)"
        )
    if compressed:
        return Layout(".mha", shape, dtype, 0, pos, affine)
    return Layout(".mha", shape, dtype, pos, None, affine)


def _why(e: Exception) -> str:
    return f"unknown or missing {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"


def _inflated_head(path: str | Path, size: int) -> bytes:
    """The first `size` bytes of a compressed file's content (fewer if it is shorter)."""
    with open(path, "rb") as f:
        return bytes(_inflate(f, 0, size, keep=size)[0])


def _inflate(f: BinaryIO, start: int, limit: int, keep: int) -> tuple[bytearray, int]:
    """The compressed stream from `start` (gzip members one after another, or zlib), inflated a chunk at a time:
    its first `keep` bytes, and how many bytes it inflates to, counted up to just past `limit` (then it stops)."""
    f.seek(start)
    d, pending = zlib.decompressobj(47), b""  # 47: a gzip or zlib header
    out, total = bytearray(), 0
    while total <= limit:
        chunk = pending or f.read(CHUNK)
        try:
            piece = d.decompress(chunk, min(CHUNK, limit + 1 - total))
        except zlib.error as e:
            raise ValueError(f"not a readable image: corrupt compressed data ({e})") from None
        total += len(piece)
        out += piece[: max(0, keep - len(out))]
        pending = d.unconsumed_tail
        if d.eof:  # another gzip member may follow (readers inflate them all)
            rest = d.unused_data or f.read(CHUNK)
            if not rest.startswith(GZIP):
                break
            d, pending = zlib.decompressobj(47), rest
        elif not chunk and not piece:
            break  # the file ended before the stream did: truncated
    return out, total


def _check_folder(path: str, max_voxels: int) -> None:
    import pydicom  # only the command line reads folders

    files = sorted(e.path for e in os.scandir(path) if e.is_file())
    if not files:
        raise ValueError("an empty folder (a folder is read as a DICOM series)")
    try:
        first = pydicom.dcmread(files[0], stop_before_pixels=True)
        voxels = int(first.Rows) * int(first.Columns) * int(first.get("NumberOfFrames") or 1) * len(files)
    except Exception as e:  # not DICOM, or no image attributes
        raise ValueError(f"not a readable DICOM series folder ({type(e).__name__}: {e})") from None
    if voxels > max_voxels:
        raise ValueError(f"the series holds {voxels:,} voxels, more than the limit of {max_voxels:,}")
