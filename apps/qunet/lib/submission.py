"""What a submitted label means: its annotated slices, merged with earlier submissions for the same volume.

A client such as 3D Slicer submits the whole label volume, but after "Next sample" it shows only the new
slices' segmentation, so a second submission for a volume would blank the slices annotated before. Those
slices keep their earlier content unless this submission annotates them again.
"""

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from monailabel.interfaces.datastore import Datastore

from qunet.annotation import annotated_slices
from qunet.io import load_label, load_stack

from lib import records


def _write_like(array_xyz: np.ndarray, reference_file: str) -> str:
    """Write a (X, Y, Z) label with the geometry and format of `reference_file`; returns the new file."""
    reference = sitk.ReadImage(reference_file)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array_xyz, (2, 1, 0))))
    image.CopyInformation(reference)
    fd, path = tempfile.mkstemp(suffix="".join(Path(reference_file).suffixes))
    os.close(fd)
    sitk.WriteImage(image, path, useCompression=True)
    return path


def prepare_submission(datastore: Datastore, image_id: str, label_file: str, label_info: dict[str, Any]) -> tuple[str, dict]:
    """Check a final label against its image; return (file to store, image-info update). Raises StackError."""
    stack = load_stack(datastore.get_image_uri(image_id))
    new = load_label(label_file, stack)
    info = datastore.get_image_info(image_id)
    served_all = info.get(records.SERVED) or {}
    client = str(label_info.get("client_id") or "anonymous")
    mine = served_all.get(client)
    served = mine["slices"] if mine else sorted({k for s in served_all.values() for k in s["slices"]}) or None
    previous = records.annotated(datastore, image_id, info, stack.num_slices)
    now = annotated_slices(new, (), served, label_info.get("annotated_slices"))
    keep_old = sorted(set(previous) - set(now))
    old_file = datastore.get_label_uri(image_id, "final") if datastore.get_label_by_image_id(image_id, "final") else ""
    if keep_old and old_file and os.path.exists(old_file):
        merged = new.copy()
        merged[:, :, keep_old] = load_label(old_file, stack)[:, :, keep_old]
        label_file = _write_like(merged, label_file)
    if mine:
        served_all[client] = {**mine, "submitted": True}
    return label_file, {records.ANNOTATED: sorted(set(previous) | set(now)), records.SERVED: served_all}
