"""What a submitted label means: its annotated slices, merged with earlier submissions for the same volume.

A client such as 3D Slicer submits the whole label volume, but after "Next sample" it shows only the new
slices' segmentation, so a second submission for a volume would blank the slices annotated before. Those
slices keep their earlier content unless this submission annotates them again.

A label is checked before anything is stored: readable, the image's shape and geometry, values 0 (background)
to 255 (with several app labels: to their number; with one, any non-zero value is foreground, as a client
may number its segments from 2); `annotated_slices`, when given, "all" or a list of slice indices.
"""

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from monailabel.interfaces.datastore import Datastore

from qunet.annotation import annotated_slices
from qunet.io import Stack, StackError, load_label, load_stack

from qunet_app.datastore import keys
from qunet_app.datastore.files import TMP_PREFIX
from qunet_app.server.errors import BadRequest, ImageNotFound, InvalidFile

logger = logging.getLogger(__name__)


def _write_like(array_xyz: np.ndarray, reference_file: str, folder: str | None) -> str:
    """Write a (X, Y, Z) label with the geometry and format of `reference_file` into `folder` (None: the system's
    temporary folder) under a temporary name of ours; returns the new file."""
    reference = sitk.ReadImage(reference_file)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array_xyz, (2, 1, 0))))
    image.CopyInformation(reference)
    fd, path = tempfile.mkstemp(suffix="".join(Path(reference_file).suffixes), prefix=TMP_PREFIX, dir=folder)
    os.close(fd)
    sitk.WriteImage(image, path, useCompression=True)
    return path


def load_image(datastore: Datastore, image_id: str) -> Stack:
    uri = datastore.get_image_uri(image_id)
    if not uri:
        raise ImageNotFound(image_id)
    try:
        return load_stack(uri)
    except StackError as e:
        raise InvalidFile(f"image {image_id!r} cannot be used: {e}") from e


def check_label(
    datastore: Datastore, image_id: str, label_file: str, image: Stack | None = None
) -> tuple[Stack, np.ndarray]:
    """The image and the label as (X, Y, Z) uint8 on its grid; raises InvalidFile (HTTP 422) naming the problem."""
    image = image if image is not None else load_image(datastore, image_id)

    def rejected(problem: str) -> InvalidFile:
        return InvalidFile(f"label for {image_id!r} rejected: {problem.replace(str(label_file), 'the label file')}")

    try:
        label = load_label(label_file, image)  # readable, shape, geometry, non-negative integer values
    except StackError as e:
        raise rejected(str(e)) from e
    max_label = getattr(datastore, "max_label", None)
    if max_label is not None and label.max(initial=0) > max_label:
        bad = sorted({int(v) for v in np.unique(label) if v > max_label})[:5]
        raise rejected(f"label values must be 0 (background) to {max_label} (one per app label), found {bad}")
    return image, label


def _declared(value: Any, depth: int) -> str | list[int] | None:
    if value is None or value == "all":
        return value
    if not isinstance(value, list) or not all(isinstance(k, int) and not isinstance(k, bool) for k in value):
        raise BadRequest(f'annotated_slices must be "all" or a list of slice indices, got {value!r}')
    if any(k < 0 or k >= depth for k in value):
        raise BadRequest(f"annotated_slices must lie in 0..{depth - 1}, got {value}")
    return value


def prepare_submission(
    datastore: Datastore, image_id: str, label_file: str, label_info: dict[str, Any], scratch: str | None = None
) -> tuple[str, dict]:
    """Check a final label against its image; return (file to store, image-info update). A label merged with
    earlier slices is a new file in `scratch` (None: the system's temporary folder), which the caller removes; a
    store that sweeps our temporary names from a folder after a crash passes that folder.

    Raises InvalidFile (a StackError; HTTP 422) for a label or image that cannot be used, BadRequest (HTTP 400)
    for bad params. Nothing is written before the checks pass."""
    stack, new = check_label(datastore, image_id, label_file)
    declared = _declared(label_info.get("annotated_slices"), stack.num_slices)
    info = datastore.get_image_info(image_id)
    served_all = info.get(keys.SERVED) or {}
    try:
        client = keys.client_id(label_info.get("client_id"))
    except ValueError as e:
        raise BadRequest(str(e)) from None
    mine = served_all.get(client)
    served = mine["slices"] if mine else sorted({k for s in served_all.values() for k in s["slices"]}) or None
    previous = keys.annotated(datastore, image_id, info, stack.num_slices)
    now = annotated_slices(new, (), served, declared)
    keep_old = sorted(set(previous) - set(now))
    old_file = datastore.get_label_uri(image_id, "final") if datastore.get_label_by_image_id(image_id, "final") else ""
    if keep_old and old_file and os.path.exists(old_file):
        try:
            old = load_label(old_file, stack)
        except StackError as e:  # an unusable stored label must not block new submissions: this one replaces it
            logger.warning(f"stored label of {image_id!r} unreadable, not merged: {e}")
        else:
            merged = new.copy()
            merged[:, :, keep_old] = old[:, :, keep_old]
            label_file = _write_like(merged, label_file, scratch)
    if mine:
        served_all[client] = {**mine, "submitted": True}
    return label_file, {keys.ANNOTATED: sorted(set(previous) | set(now)), keys.SERVED: served_all}
