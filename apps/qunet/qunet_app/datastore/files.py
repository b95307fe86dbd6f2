"""Files written so that a crash leaves either the old or the complete new one, and the image suffixes we read."""

import contextlib
import os
import re
import shutil
import tempfile

from qunet.io import IMAGE_SUFFIXES

TMP_PREFIX = ".tmp-"  # our temporary files; any left over after a crash is removed on the next start
TMP_NAME = re.compile(re.escape(TMP_PREFIX) + r"[a-z0-9_]{8}")  # the names tempfile.mkstemp gives ours
FILE_SUFFIXES = IMAGE_SUFFIXES  # single-file formats only


def fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def copy_to_tmp(src: str, folder: str) -> str:
    """A durable copy of `src` in `folder` under a temporary name (no image suffix, so no scan picks it up)."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TMP_PREFIX)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except BaseException:
        os.remove(tmp)
        raise
    return tmp


def atomic_copy(src: str, dest: str) -> None:
    """Copy `src` to `dest` so that `dest` is always either the old file or the complete new one."""
    tmp = copy_to_tmp(src, os.path.dirname(dest))
    try:
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_dir(os.path.dirname(dest))


def atomic_write(data: str | bytes, dest: str) -> None:
    """Write `data` to `dest` so that `dest` is always either the old file or the complete new one, on disk."""
    folder = os.path.dirname(dest) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TMP_PREFIX)
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_dir(folder)


def file_suffix(path: str) -> str:
    """The image suffix of a file name ('.nii.gz', '.nrrd', ...), '' when it has none we read."""
    name = os.path.basename(path).lower()
    return next((s for s in sorted(FILE_SUFFIXES, key=len, reverse=True) if name.endswith(s)), "")
