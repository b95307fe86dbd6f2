"""Checks an image file before any reader touches it: no file can make a reader read another file, or take more
memory than the voxel cap allows.

- The format comes from the bytes, not the name: NIfTI-1/2 with its data inside (.nii, or gzip-compressed .nii.gz),
  NRRD with attached data (raw or gzip encoding, no `data file` field), MetaImage with `ElementDataFile = LOCAL`
  (.mha). A detached header (NIfTI .hdr/.img, .nhdr, .mhd) or a header naming another data file is refused.
- The size comes from the header: its voxel count (all axes and channels) must be within `max_voxels`.
- Compressed data is inflated once, a chunk at a time and never kept, and must give what the header promises: less
  is a truncated file; more (a decompression bomb) is refused as soon as the inflated size passes it. The reader
  that then reads the file allocates what the header's dimensions give, which is within the cap.

A folder (a DICOM series, which the command line reads) is checked from its first file's header and its file count.
Problems raise ValueError with a message for the user.
"""

import math
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np

FORMATS = {".nii.gz": "gzip-compressed NIfTI", ".nii": "NIfTI", ".nrrd": "NRRD", ".mha": "MetaImage"}
NOT_AN_IMAGE = "not a readable image: not a single-file NIfTI (.nii, .nii.gz), NRRD (.nrrd) or MetaImage (.mha) file"
CHUNK = 1 << 20
MAX_HEADER = 1 << 20  # bytes: a text header, or a NIfTI header with its extensions
TRAILING = 1 << 16  # bytes an inflated stream may hold beyond the voxel data (padding)
GZIP = b"\x1f\x8b"
NIFTI1_SIZES = ((348).to_bytes(4, "little"), (348).to_bytes(4, "big"))
NIFTI2_SIZES = ((540).to_bytes(4, "little"), (540).to_bytes(4, "big"))
META_KEY = re.compile(rb"\s*[A-Za-z][A-Za-z0-9_]*\s*=")
META_SIZES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
              "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}


@dataclass(frozen=True)
class Layout:
    """Where a file's voxel data is and how big it is, from its header."""

    format: str  # a key of FORMATS
    shape: tuple[int, ...]  # every axis, channels included
    itemsize: int
    data_start: int  # offset of the voxel data in the file, or in the inflated stream when compressed
    stream_start: int | None = None  # where the compressed stream starts in the file; None when not compressed

    @property
    def voxels(self) -> int:
        return math.prod(self.shape)


def check(path: str | Path, max_voxels: int) -> str:
    """The file's format (a key of FORMATS; "" for a folder) once it is found safe to read; ValueError if not."""
    if os.path.isdir(path):
        _check_folder(str(path), max_voxels)
        return ""
    layout = file_layout(path)
    if any(n < 1 for n in layout.shape):
        raise ValueError(f"not a readable image: bad dimensions {layout.shape} in the header")
    if layout.voxels > max_voxels:
        raise ValueError(f"the header gives {' x '.join(map(str, layout.shape))} = {layout.voxels:,} voxels, "
                         f"more than the limit of {max_voxels:,}")
    need = layout.data_start + layout.voxels * layout.itemsize
    if layout.stream_start is None:
        have = os.path.getsize(path)
    else:
        have = _inflated_size(path, layout.stream_start, need + TRAILING)
        if have > need + TRAILING:
            raise ValueError(f"compressed data inflates beyond the {need:,} bytes its header gives: refused")
    if have < need:
        raise ValueError(f"not a readable image: truncated ({have:,} of {need:,} bytes)")
    return layout.format


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
        shape, itemsize, offset = header.get_data_shape(), header.get_data_dtype().itemsize, int(header.get_data_offset())
    except Exception as e:  # nibabel raises several kinds for a malformed header
        raise ValueError(f"not a readable image: bad NIfTI header ({_why(e)})") from None
    if not size + 4 <= offset <= MAX_HEADER:
        raise ValueError(f"not a readable image: NIfTI data offset {offset} outside {size + 4}..{MAX_HEADER}")
    return Layout(".nii.gz" if compressed else ".nii", tuple(int(n) for n in shape), itemsize, offset,
                  0 if compressed else None)


def _nrrd(head: bytes) -> Layout:
    end = min((i + n for i, n in ((head.find(b"\n\n"), 2), (head.find(b"\r\n\r\n"), 4)) if i >= 0), default=-1)
    if end < 0:
        raise ValueError(f"not a readable image: NRRD header without an end in its first {MAX_HEADER:,} bytes")
    try:
        header = nrrd.read_header(head[:end].decode("latin-1").splitlines())
        itemsize = nrrd.reader._determine_datatype(header).itemsize  # pynrrd's own type table
        shape = tuple(int(n) for n in np.atleast_1d(header["sizes"]))
    except Exception as e:  # pynrrd raises NRRDError, KeyError, ValueError, ...
        raise ValueError(f"not a readable image: bad NRRD header ({_why(e)})") from None
    named = header.get("data file", header.get("datafile"))
    if named is not None:
        raise ValueError(f"an NRRD header naming a separate data file ({str(named)[:80]!r}): "
                         "send one .nrrd file holding its data")
    encoding = str(header.get("encoding", "")).lower()
    if encoding not in ("raw", "gzip", "gz"):
        raise ValueError(f"NRRD encoding {encoding!r} is not supported: use raw or gzip")
    skip = int(header.get("byte skip", 0))
    if int(header.get("line skip", 0)) or not 0 <= skip <= MAX_HEADER and not (skip == -1 and encoding == "raw"):
        raise ValueError("NRRD 'line skip' and 'byte skip' are not supported")
    if skip == -1:  # raw data at the end of the file: the file must hold at least the header and the data
        skip = 0
    return Layout(".nrrd", shape, itemsize, skip, end) if encoding != "raw" else Layout(".nrrd", shape, itemsize, end + skip)


def _meta(head: bytes, file_size: int) -> Layout:
    fields: dict[str, str] = {}
    pos = 0
    while "ElementDataFile" not in fields:
        line_end = head.find(b"\n", pos)
        if line_end < 0:
            raise ValueError(f"not a readable image: MetaImage header without ElementDataFile in its first {MAX_HEADER:,} bytes")
        key, sep, value = head[pos:line_end].decode("latin-1").partition("=")
        pos = line_end + 1
        if sep:
            fields[key.strip()] = value.strip()
        elif key.strip():
            raise ValueError(f"not a readable image: bad MetaImage header line {key.strip()[:40]!r}")
    if fields["ElementDataFile"].lower() != "local":
        raise ValueError(f"a MetaImage header whose data lies in a separate file ({fields['ElementDataFile'][:80]!r}): "
                         "send one .mha file with ElementDataFile = LOCAL")
    try:
        shape = tuple(int(n) for n in fields["DimSize"].split()) + (int(fields.get("ElementNumberOfChannels", 1)),)
        itemsize = META_SIZES[fields["ElementType"]]
        ndims, header_size = int(fields["NDims"]), int(fields.get("HeaderSize") or 0)
    except (KeyError, ValueError) as e:
        raise ValueError(f"not a readable image: bad or missing MetaImage field ({_why(e)})") from None
    if len(shape) != ndims + 1:
        raise ValueError(f"not a readable image: MetaImage DimSize has {len(shape) - 1} values for NDims {ndims}")
    if fields.get("BinaryData", "True").lower() != "true" or header_size:
        raise ValueError("MetaImage text data and HeaderSize are not supported")
    compressed = fields.get("CompressedData", "False").lower() == "true"
    if compressed and fields.get("CompressedDataSize", "").strip() != str(file_size - pos):
        # ITK allocates what this field says, and reads zeros without an error when it is short or missing
        raise ValueError(f"MetaImage CompressedDataSize must be the size of the compressed data ({file_size - pos} bytes)")
    return Layout(".mha", shape, itemsize, 0, pos) if compressed else Layout(".mha", shape, itemsize, pos)


def _why(e: Exception) -> str:
    return f"unknown or missing {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"


def _inflated_head(path: str | Path, size: int) -> bytes:
    """The first `size` bytes of a compressed file's content (fewer if it is shorter)."""
    d, out = zlib.decompressobj(47), b""  # 47: a gzip or zlib header
    with open(path, "rb") as f:
        try:
            while len(out) < size and not d.eof:
                chunk = d.unconsumed_tail or f.read(CHUNK)
                if not chunk:
                    break
                out += d.decompress(chunk, size - len(out))
        except zlib.error as e:
            raise ValueError(f"not a readable image: corrupt compressed data ({e})") from None
    return out


def _inflated_size(path: str | Path, start: int, limit: int) -> int:
    """How many bytes the compressed stream from `start` inflates to (gzip members one after another, or zlib),
    counted chunk by chunk without keeping them; stops as soon as the count passes `limit`."""
    total = 0
    with open(path, "rb") as f:
        f.seek(start)
        d, pending = zlib.decompressobj(47), b""
        while True:
            chunk = pending or f.read(CHUNK)
            try:
                out = d.decompress(chunk, CHUNK)
            except zlib.error as e:
                raise ValueError(f"not a readable image: corrupt compressed data ({e})") from None
            total += len(out)
            if total > limit:
                return total
            pending = d.unconsumed_tail
            if d.eof:  # another gzip member may follow (readers inflate them all)
                rest = d.unused_data or f.read(CHUNK)
                if not rest.startswith(GZIP):
                    return total
                d, pending = zlib.decompressobj(47), rest
            elif not chunk and not out:
                return total  # the file ended before the stream did: truncated


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
