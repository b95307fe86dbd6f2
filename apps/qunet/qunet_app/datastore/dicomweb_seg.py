"""The DICOMweb datastore's final labels: DICOM SEG series on the server, read back onto the image grid.

- A final label is uploaded as a SEG made by dcmqi's `itkimage2segimage`, its segments named after the app's
  labels. dcmqi writes no SEG without segments: a label with no foreground has none.
- dcmqi keeps only the slices from the first to the last with foreground, so a SEG read back is cropped, with a
  shifted origin; each segment is resampled by physical position onto the cached image (nearest neighbour) and
  the result cached per SEG.
- The server's SEG series are indexed by the image series they reference; one QIDO listing is reused for
  SEG_INDEX_SECONDS, and each SEG's reference and time (a SEG never changes) are kept on disk for every process.
"""

import json
import logging
import os
import shutil
import sys
import tempfile
from datetime import datetime
from typing import Any

import numpy as np
import pydicom
import pydicom_seg
import SimpleITK as sitk
from filelock import FileLock
from monailabel.datastore.utils.convert import nifti_to_dicom_seg
from monailabel.interfaces.datastore import DefaultLabelTag
from pydicom.dataset import Dataset

from qunet.io import load_stack

from qunet_app.datastore.dicomweb_series import UID, check_series, qido_value
from qunet_app.datastore.files import atomic_write

SEG_INDEX_SECONDS = 5  # how long one QIDO listing of the server's SEG series is reused
SEG_TOOL = "itkimage2segimage"
logger = logging.getLogger(__name__)


def _seg_time(meta: Dataset) -> float:
    """When a SEG was made (its SeriesDate/Time, else ContentDate/Time), in seconds since the epoch; 0 if unknown."""
    for date, clock in (("SeriesDate", "SeriesTime"), ("ContentDate", "ContentTime")):
        d, t = str(meta.get(date, "") or ""), str(meta.get(clock, "") or "")
        if len(d) == 8:
            t = (t.split(".")[0] + "000000")[:6]
            try:
                return datetime.strptime(d + t, "%Y%m%d%H%M%S").timestamp()
            except ValueError:
                continue
    return 0.0


def find_seg_tool() -> str | None:
    """dcmqi's itkimage2segimage: on PATH, else next to this interpreter (dcmqi's wheel puts it there)."""
    found = shutil.which(SEG_TOOL)
    if found:
        return found
    beside = os.path.join(os.path.dirname(sys.executable), SEG_TOOL)
    if os.access(beside, os.X_OK):
        os.environ["PATH"] = (
            os.path.dirname(beside) + os.pathsep + os.environ.get("PATH", "")
        )  # MONAI Label runs it by name
        return beside
    return None


class DicomSegMixin:
    """For QUNetDICOMWebDatastore: the index of the server's SEG series, SEG -> label on the grid, label -> SEG.

    Uses what QUNetDICOMWebDatastore sets up: `_names` and `_values` (the app's label names by value and back),
    `_grid_dir`, `_lock_dir`, `_cache_lock`, `_seg_meta_file`, `_seg_meta` and `_seg_index_cache`; and from
    SeriesCacheMixin `get_image_uri`, `_download` and `_series_dir`.
    """

    def _load_seg_meta(self) -> dict[str, list | None]:
        try:
            with open(self._seg_meta_file) as f:
                return dict(json.load(f))
        except (OSError, ValueError):
            return {}

    def _save_seg_meta(self) -> None:
        with FileLock(os.path.join(self._lock_dir, "qunet-segs.lock")):
            atomic_write(json.dumps({**self._load_seg_meta(), **self._seg_meta}), self._seg_meta_file)

    def _seg_info(self, study_uid: str, seg_uid: str) -> tuple[str, float] | None:
        """(referenced image series, creation time) of a SEG; None when it names no series."""
        if seg_uid not in self._seg_meta:
            found = self._client.retrieve_series_metadata(study_uid, seg_uid)
            meta = Dataset.from_json(found[0]) if found else Dataset()
            refs = meta.get("ReferencedSeriesSequence")
            self._seg_meta[seg_uid] = [str(refs[0].SeriesInstanceUID), _seg_time(meta)] if refs else None
            self._seg_meta_dirty = True
        found = self._seg_meta[seg_uid]
        return (found[0], float(found[1])) if found else None

    def _seg_index(self) -> dict[str, list[tuple[float, str, str]]]:
        """image series -> its SEG series on the server as (time, SEG uid, study uid), oldest first."""
        with self._cache_lock:
            if "index" not in self._seg_index_cache:
                index: dict[str, list[tuple[float, str, str]]] = {}
                self._seg_meta_dirty = False
                for ds in self._client.search_for_series(search_filters={"Modality": "SEG"}):
                    study, seg = qido_value(ds, "0020000D"), qido_value(ds, "0020000E")
                    if not (UID.match(study) and UID.match(seg)):  # they name cache files; the client refuses them
                        logger.warning(f"SEG series {seg!r} of study {study!r}: not DICOM UIDs, ignored")
                        continue
                    found = self._seg_info(study, seg)
                    if found and UID.match(found[0]):
                        index.setdefault(found[0], []).append((found[1], seg, study))
                if self._seg_meta_dirty:
                    self._save_seg_meta()
                for segs in index.values():
                    segs.sort()
                self._seg_index_cache["index"] = index
            return self._seg_index_cache["index"]

    def _forget_segs(self) -> None:
        with self._cache_lock:
            self._seg_index_cache.clear()

    def _seg_on_grid(self, image_id: str, seg_uid: str, study_uid: str) -> str:
        out = os.path.join(self._grid_dir, f"{seg_uid}.nii.gz")
        if os.path.exists(out):
            return out
        image_file = self.get_image_uri(image_id)
        with FileLock(os.path.join(self._lock_dir, f"{seg_uid}.lock")):
            if os.path.exists(out):
                return out
            seg_dir = os.path.join(self._datastore.label_path(DefaultLabelTag.FINAL.value), seg_uid)
            if not (os.path.isdir(seg_dir) and os.listdir(seg_dir)):
                self._download(study_uid, seg_uid, seg_dir)
            check_series(seg_dir)
            first = sorted(os.listdir(seg_dir))[0]  # dcmqi writes a SEG as one instance
            label = self._segments_on(pydicom.dcmread(os.path.join(seg_dir, first)), sitk.ReadImage(image_file))
            fd, tmp = tempfile.mkstemp(dir=self._grid_dir, prefix=".tmp-", suffix=".nii.gz")
            os.close(fd)
            try:
                sitk.WriteImage(label, tmp, useCompression=True)
                os.replace(tmp, out)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        return out

    def _segments_on(self, seg: pydicom.Dataset, reference: sitk.Image) -> sitk.Image:
        """Each segment resampled (nearest neighbour, by physical position) onto `reference`, as label values.

        A segment named after one of the app's labels gets that label's value, else its segment number.
        """
        result = pydicom_seg.SegmentReader().read(seg)
        label = np.zeros(sitk.GetArrayViewFromImage(reference).shape, np.uint8)
        names = {int(s.SegmentNumber): str(s.get("SegmentLabel", "")) for s in seg.SegmentSequence}
        for number in sorted(result.available_segments):
            mask = sitk.Resample(
                result.segment_image(number), reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8
            )
            label[sitk.GetArrayViewFromImage(mask) > 0] = self._values.get(names.get(number, ""), number)
        image = sitk.GetImageFromArray(label)
        image.CopyInformation(reference)
        return image

    def _upload_seg(self, image_id: str, label_file: str, label_info: dict[str, Any]) -> str:
        """The label as a DICOM SEG on the server (segments named after the app's labels); its SeriesInstanceUID.

        "" for a label without foreground: dcmqi writes no SEG without segments.
        """
        values = [int(v) for v in np.unique(load_stack(label_file).array) if v > 0]
        if not values:
            return ""
        if not find_seg_tool():
            raise RuntimeError(f"dcmqi's {SEG_TOOL} is not on PATH: pip install dcmqi (it is in requirements.txt)")
        sent = {int(i["idx"]): i for i in label_info.get("label_info") or [] if isinstance(i, dict) and "idx" in i}
        segments = []
        for v in values:
            name = self._names.get(v) or sent.get(v, {}).get("name") or f"label {v}"
            segment = {
                "name": name,
                "description": name,
                "model_name": "QU-net++ label",
            }  # model_name: SeriesDescription
            if "color" in sent.get(v, {}):
                segment["color"] = sent[v]["color"]
            segments.append(segment)
        seg_file = nifti_to_dicom_seg(self._series_dir(image_id), label_file, segments)
        try:
            if not seg_file or not os.path.exists(seg_file) or not os.path.getsize(seg_file):
                raise RuntimeError(f"{SEG_TOOL} made no DICOM SEG for {image_id} (see the server log)")
            seg = pydicom.dcmread(seg_file)
            response = self._client.store_instances([seg])
            if response.get("FailedSOPSequence"):
                raise RuntimeError(f"{self._client.base_url} refused the SEG for {image_id}")
            return str(seg.SeriesInstanceUID)
        finally:
            if seg_file and os.path.exists(seg_file):
                os.remove(seg_file)
