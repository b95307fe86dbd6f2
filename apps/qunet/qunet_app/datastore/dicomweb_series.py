"""The DICOMweb datastore's images: the server's image series, each cached as one NIfTI.

- Images are the series matching MONAI_LABEL_DICOMWEB_SEARCH_FILTER, where a list value means any of those
  values (e.g. {"Modality": ["CT", "MR"]}); SEG, SR and other non-image series never count as images.
- Series download and NIfTI conversion happen under a per-series lock into a temporary folder that is renamed
  when complete (the stock code lets two processes read a half-downloaded series), and the cached NIfTI keeps
  one path (the stock code returns a temporary file the first time).
- The series' DICOM PatientID is kept as `DicomPatientID`: image info is merged into the Next sample answer,
  and a `PatientID` there would hide the strategy's "<id> - annotate slices (K) ..." hint that 3D Slicer
  and OHIF show.
"""

import itertools
import os
import re
import shutil
import tempfile
import time
from typing import Any

from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel
from monailabel.datastore.utils.convert import dicom_to_nifti
from monailabel.datastore.utils.dicom import dicom_web_download_series
from monailabel.interfaces.exception import ImageNotFoundException
from pydicom.dataset import Dataset

from qunet.io import StackError, check_file

from qunet_app.datastore.files import atomic_copy
from qunet_app.server.errors import InvalidFile

UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
NOT_IMAGES = {"SEG", "SR", "RTSTRUCT", "RTPLAN", "RTDOSE", "PR", "KO", "REG", "DOC", "OT"}


def qido_value(ds: dict, tag: str) -> str:
    """The first value of an attribute (hex tag) of a QIDO-RS JSON answer, as text; "" when absent."""
    values = (ds.get(tag) or {}).get("Value") or [""]
    return str(values[0])


def check_series(folder: str) -> None:
    """The voxel cap (rows x columns x frames x files, from the first header) before a reader loads every instance:
    a series or SEG the server holds is as untrusted as an upload (422)."""
    try:
        check_file(folder)
    except StackError as e:
        raise InvalidFile(str(e)) from None


class SeriesCacheMixin:
    """For QUNetDICOMWebDatastore (before DICOMWebDatastore): listing, download and NIfTI cache of the image series.

    Uses what QUNetDICOMWebDatastore sets up: `_lock_dir`, `_cache_lock`, `_images_cache` and `_listings`.
    """

    def list_images(self) -> list[str]:
        """Series matching the search filter (a list value: any of its values), without SEG and other non-images."""
        with self._cache_lock:
            if "images" not in self._images_cache:
                keys = list(self._search_filter)
                choices = [v if isinstance(v, (list, tuple)) else [v] for v in self._search_filter.values()]
                series: dict[str, None] = {}
                for combo in itertools.product(*choices):
                    for ds in self._client.search_for_series(search_filters=dict(zip(keys, combo))):
                        if qido_value(ds, "00080060").upper() not in NOT_IMAGES:
                            series[qido_value(ds, "0020000E")] = None
                self._images_cache["images"] = list(series)
                self._listings += 1
            return list(self._images_cache["images"])

    def _check_uid(self, uid: str) -> None:
        if not UID.match(uid or ""):
            raise ImageNotFoundException(f"Image {uid!r} not found: DICOMweb image ids are SeriesInstanceUIDs")

    def _series_dir(self, image_id: str) -> str:
        return os.path.realpath(os.path.join(self._datastore.image_path(), image_id))

    def _image_file(self, image_id: str) -> str:
        return os.path.realpath(os.path.join(self._datastore.image_path(), f"{image_id}.nii.gz"))

    def get_image_uri(self, image_id: str) -> str:
        """The series as a cached NIfTI (slice k = InstanceNumber k + 1 for series written by `qunet upload`)."""
        self._check_uid(image_id)
        cached = self._image_file(image_id)
        with FileLock(os.path.join(self._lock_dir, f"{image_id}.lock")):
            self._fresh()
            if image_id in self._datastore.objects and os.path.exists(cached):
                return cached
            series_dir = self._series_dir(image_id)
            if not (os.path.isdir(series_dir) and os.listdir(series_dir)):
                self._download(None, image_id, series_dir)
            check_series(series_dir)
            converted = dicom_to_nifti(series_dir)
            try:
                self._cache_image(image_id, converted, self._series_info(image_id))
            finally:
                if os.path.exists(converted) and os.path.realpath(converted) != cached:
                    os.remove(converted)
        return cached

    def _download(self, study_id: str | None, series_id: str, dest: str) -> None:
        """Fetch a series into `dest`, which appears only once complete."""
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".download-", dir=os.path.dirname(dest))
        try:
            try:
                dicom_web_download_series(study_id, series_id, tmp, self._client, self._fetch_by_frame)
            except IndexError:  # the lookup of its study found nothing
                raise ImageNotFoundException(f"series {series_id} not found on {self._client.base_url}") from None
            if not os.listdir(tmp):
                raise ImageNotFoundException(f"series {series_id} on {self._client.base_url} has no instances")
            if os.path.isdir(dest):
                shutil.rmtree(dest)  # an empty leftover
            os.rename(tmp, dest)
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)

    def _series_info(self, series_id: str) -> dict[str, Any]:
        found = self._client.search_for_series(search_filters={"SeriesInstanceUID": series_id})
        meta = Dataset.from_json(found[0]) if found else Dataset()
        info: dict[str, Any] = {"SeriesInstanceUID": series_id}
        for field in ("StudyInstanceUID", "StudyDate", "StudyTime", "Modality", "SeriesDescription", "RetrieveURL"):
            info[field] = str(meta[field].value) if meta.get(field) else "UNK"
        info["DicomPatientID"] = str(meta.PatientID) if meta.get("PatientID") else "UNK"
        return info

    def _cache_image(self, image_id: str, image_file: str, image_info: dict[str, Any]) -> None:
        dest = self._image_file(image_id)
        info = {**image_info, "ts": int(time.time()), "name": os.path.basename(dest)}

        def change() -> None:
            atomic_copy(image_file, dest)
            obj = self._datastore.objects.get(image_id)
            if obj:  # keep what the app recorded (a cache re-made after its NIfTI was deleted)
                obj.image.info.update({k: v for k, v in info.items() if k not in obj.image.info or k in ("ts", "name")})
                obj.image.ext = ".nii.gz"
            else:
                self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=".nii.gz"))

        self._locked_update(change)

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        raise ValueError(
            "this datastore takes its images from the DICOMweb server: upload them there "
            f"(python -m qunet upload {self._client.base_url} STACK...)"
        )
