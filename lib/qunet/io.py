"""Loading 3D stacks and their labels through MONAI's LoadImage.

Slice-axis convention, used everywhere in this project: a stack is the array MONAI's LoadImage returns,
indexed (i, j, k) in the file's own voxel order with no reorientation, and slice k is `array[:, :, k]`.
That is the third voxel index (K) of the file, which 3D Slicer's Data Probe shows as the last IJK
coordinate, so slice k names the same pixels in a NIfTI, an NRRD or a DICOM copy of one stack.

Every read is checked first by `qunet.safe_read` (single-file formats only, the voxel cap, capped decompression),
with the process's `ReadConfig` (the app sets it from its --conf max_voxels).
"""

import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.transforms import LoadImage

from qunet import safe_read
from qunet.config import ReadConfig

IMAGE_SUFFIXES = tuple(safe_read.FORMATS)  # single-file formats only: a detached header (.nhdr, .mhd) is refused


class StackError(ValueError):
    """A file that cannot serve as a 3D stack (or as its label); the message names the file and the problem."""


@dataclass
class Stack:
    array: np.ndarray  # float32, (X, Y, Z)
    affine: np.ndarray  # 4x4 voxel-to-RAS
    path: str

    @property
    def num_slices(self) -> int:
        return int(self.array.shape[2])


_read_config = ReadConfig()


def set_read_config(config: ReadConfig) -> None:
    """The limits of every later read in this process."""
    global _read_config
    _read_config = config


def check_file(path: str | Path) -> str:
    """The format of the file (a key of safe_read.FORMATS; "" for a folder) if it passes the checks made before every
    read, with this process's limits; StackError naming the problem if not."""
    try:
        return safe_read.check(path, _read_config.max_voxels)
    except (ValueError, OSError) as e:
        raise StackError(f"{path}: {e}") from None


def _read(path: str | Path, named: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Voxels (X, Y, Z) and affine; with `named`, a file's name must end in its format's suffix, as the viewers the
    server hands it to (3D Slicer, OHIF) choose their reader by name."""
    if not os.fspath(path):  # Path("") is the working folder
        raise StackError("no file given")
    path = Path(path)
    if not path.exists():
        raise StackError(f"{path}: no such file or folder")
    if not path.is_dir():  # files: decoded by the same parse that checked them (qunet.safe_read)
        try:
            array, affine, found = safe_read.read(path, _read_config.max_voxels)
        except (ValueError, OSError) as e:
            raise StackError(f"{path}: {e}") from None
        if named and not path.name.lower().endswith(found):
            raise StackError(f"{path}: holds {safe_read.FORMATS[found]} data, but its name does not end in {found}")
    else:
        check_file(path)
        try:
            image = LoadImage(image_only=True)(str(path))  # a DICOM series (the command line)
        except Exception as e:  # readers raise many kinds of errors for foreign files
            raise StackError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e
        array, affine = np.asarray(image), np.asarray(image.affine, dtype=np.float64)
    while array.ndim > 3 and array.shape[-1] == 1:  # NIfTI often stores 3D as (X, Y, Z, 1)
        array = array[..., 0]
    if array.ndim != 3:
        raise StackError(f"{path}: need a single-channel 3D stack, got an array of shape {array.shape}")
    return array, np.asarray(affine, dtype=np.float64)


def write_canonical(path: str | Path, out: str | Path) -> None:
    """Rewrite an image or label file as a NIfTI file (`out`, ending in .nii.gz) holding what `_read` decodes from it:
    uploads are stored in this one form, which every reader (MONAI Label's, SimpleITK, nibabel) reads alike.
    StackError if the file is refused; its name does not matter (an upload's is the client's)."""
    array, affine = _read(path, named=False)
    native = np.float32 if array.dtype == np.float16 else array.dtype.newbyteorder("=")  # NIfTI-1 has no float16
    nib.Nifti1Image(array.astype(native, copy=False), affine).to_filename(str(out))


def load_stack(path: str | Path) -> Stack:
    """Read a 3D image (NIfTI, NRRD, MetaImage or a DICOM series folder) as float32 (X, Y, Z)."""
    array, affine = _read(path)
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise StackError(f"{path}: {int(np.size(array) - np.isfinite(array).sum())} voxels are NaN or infinite")
    return Stack(array, affine, str(path))


def load_label(path: str | Path, like: Stack) -> np.ndarray:
    """Read a label volume on the grid of `like`; values are non-negative integers (0 = background)."""
    array, affine = _read(path)
    if array.shape != like.array.shape:
        raise StackError(f"{path}: label shape {array.shape} differs from image shape {like.array.shape}")
    if not np.allclose(affine, like.affine, atol=1e-3):
        raise StackError(f"{path}: label geometry (affine) differs from the image's")
    if not np.isfinite(array).all() or (array < 0).any() or (array > 255).any() or (array != np.round(array)).any():
        raise StackError(f"{path}: label values must be integers from 0 to 255")
    return array.astype(np.uint8)


def stack_id(path: str | Path) -> str:
    """File name without its image suffix, as MONAI Label names datastore images."""
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def file_signature(path: str | Path) -> str:
    """Size, modification time and inode: changes whenever the file's content is replaced, also by an atomic
    replace within one tick of the file system's clock (same-size models are common)."""
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
