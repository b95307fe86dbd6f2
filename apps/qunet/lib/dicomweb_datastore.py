"""MONAI Label's DICOMweb datastore (`--studies http://.../dicom-web`) with the app's label checks and bookkeeping.

MONAI Label keeps a DICOMweb server's images as series (image id = SeriesInstanceUID), converts a series to a
cached NIfTI when it is needed, and stores a final label back on the server as a DICOM SEG made by dcmqi's
`itkimage2segimage`. Its local cache folder also holds a datastore JSON with the image info where the app
keeps its records (quality, disagreement, served and annotated slices). On top of the stock class:

- `save_label` checks the label against the image and does the annotated-slice bookkeeping first
  (`lib.submission.prepare_submission`, as the local datastore does), then uploads the merged label as a
  SEG whose segments are named after the app's labels, then records label and image info in one locked,
  atomic update. A label with no foreground (all served slices negative) has no SEG (dcmqi cannot write
  one); it is kept in the cache only.
- `get_label_uri(image, "final")` gives the newest label of the image ON THE IMAGE'S GRID. dcmqi keeps only
  the slices from the first to the last with foreground, so a SEG read back is cropped, with a shifted origin; each
  segment is resampled by physical position onto the cached image (nearest neighbour) and the result cached
  per SEG. The newest SEG on the server wins, so a SEG made elsewhere (another server, a viewer) is picked up.
- Series download and NIfTI conversion happen under a per-series lock into a temporary folder that is renamed
  when complete (the stock code lets two processes read a half-downloaded series), and the cached NIfTI keeps
  one path (the stock code returns a temporary file the first time).
- Image info is re-read from the JSON before each read, so the server sees what its scoring and training
  subprocesses wrote, and every write is a locked reload-change-replace (from `QUNetDatastore`).
- Images are the series matching MONAI_LABEL_DICOMWEB_SEARCH_FILTER, where a list value means any of those
  values (e.g. {"Modality": ["CT", "MR"]}); SEG, SR and other non-image series never count as images.
- The series' DICOM PatientID is kept as `DicomPatientID`: image info is merged into the Next sample answer,
  and a `PatientID` there would hide the strategy's "<id> - annotate slices (K) ..." hint that 3D Slicer
  and OHIF show.
"""

import itertools
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from datetime import datetime
from typing import Any

import numpy as np
import pydicom
import pydicom_seg
import SimpleITK as sitk
from cachetools import TTLCache
from dicomweb_client import DICOMwebClient
from filelock import FileLock
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore
from monailabel.datastore.utils.convert import binary_to_image, dicom_to_nifti, nifti_to_dicom_seg
from monailabel.datastore.utils.dicom import dicom_web_download_series
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.exception import ImageNotFoundException
from pydicom.dataset import Dataset

from qunet.io import load_label, load_stack

from lib import records
from lib.datastore import QUNetDatastore
from lib.files import atomic_copy
from lib.submission import prepare_submission

logger = logging.getLogger(__name__)

FINAL = DefaultLabelTag.FINAL.value
UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
NOT_IMAGES = {"SEG", "SR", "RTSTRUCT", "RTPLAN", "RTDOSE", "PR", "KO", "REG", "DOC", "OT"}
SEG_INDEX_SECONDS = 5  # how long one QIDO listing of the server's SEG series is reused
SEG_TOOL = "itkimage2segimage"


def _value(ds: dict, tag: str) -> str:
    values = (ds.get(tag) or {}).get("Value") or [""]
    return str(values[0])


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
        os.environ["PATH"] = os.path.dirname(beside) + os.pathsep + os.environ.get("PATH", "")  # MONAI Label runs it by name
        return beside
    return None


class QUNetDICOMWebDatastore(DICOMWebDatastore, QUNetDatastore):
    _forgets_labels = False  # labels are SEG series on the server, not files of the cache

    def __init__(
        self,
        client: DICOMwebClient,
        search_filter: dict[str, Any],
        cache_path: str | None = None,
        fetch_by_frame: bool = False,
        labels: dict[str, int] | None = None,
        list_seconds: float = 7200,
    ) -> None:
        super().__init__(client, search_filter, cache_path=cache_path, fetch_by_frame=fetch_by_frame, convert_to_nifti=True)
        self._names = {int(v): k for k, v in (labels or {}).items()}
        self._values = {k: int(v) for k, v in (labels or {}).items()}
        self._grid_dir = os.path.join(self._datastore_path, "qunet-grid")  # labels on the image grid, one per SEG
        self._lock_dir = os.path.join(self._datastore_path, "qunet-locks")
        os.makedirs(self._grid_dir, exist_ok=True)
        os.makedirs(self._lock_dir, exist_ok=True)
        self._images_cache: TTLCache = TTLCache(maxsize=1, ttl=list_seconds)
        self._listings = 0  # how many times the series were listed: a new listing may add or drop images
        # SEG uid -> [referenced series, time] or None; SEGs never change, so this is kept on disk for the
        # scoring and training subprocesses (each would otherwise fetch the metadata of every SEG again)
        self._seg_meta_file = os.path.join(self._datastore_path, "qunet-segs.json")
        self._seg_meta: dict[str, list | None] = self._load_seg_meta()
        self._seg_index_cache: TTLCache = TTLCache(maxsize=1, ttl=SEG_INDEX_SECONDS)
        self._cache_lock = threading.RLock()

    # ---- keeping the cache JSON in step with other processes -------------------------------------------------

    def _on_any_event(self, event) -> None:
        """The stock watcher re-scans the folder on any new file; this cache is written only by this class."""

    def _fresh(self) -> None:
        self._init_from_datastore_file()  # re-reads the JSON (under the lock) when another process replaced it

    def generation(self) -> Any:
        self.list_images()  # lists the server's series again once the listing has expired
        return QUNetDatastore.generation(self), self._listings

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        return QUNetDatastore.get_image_info(self, image_id)  # not DICOMWebDatastore's: no fetch to read records

    def get_label_info(self, label_id: str, label_tag: str) -> dict[str, Any]:
        self._fresh()
        return LocalDatastore.get_label_info(self, label_id, label_tag)

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        self._fresh()
        if image_id not in self._datastore.objects:
            self.get_image_uri(image_id)  # a series of the server not converted yet: fetch it first
        QUNetDatastore.update_image_info(self, image_id, info)

    # ---- images ----------------------------------------------------------------------------------------------

    def list_images(self) -> list[str]:
        """Series matching the search filter (a list value: any of its values), without SEG and other non-images."""
        with self._cache_lock:
            if "images" not in self._images_cache:
                keys = list(self._search_filter)
                choices = [v if isinstance(v, (list, tuple)) else [v] for v in self._search_filter.values()]
                series: dict[str, None] = {}
                for combo in itertools.product(*choices):
                    for ds in self._client.search_for_series(search_filters=dict(zip(keys, combo))):
                        if _value(ds, "00080060").upper() not in NOT_IMAGES:
                            series[_value(ds, "0020000E")] = None
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

    # ---- labels: SEG series on the server, converted back onto the image grid ---------------------------------

    def _load_seg_meta(self) -> dict[str, list | None]:
        try:
            with open(self._seg_meta_file) as f:
                return dict(json.load(f))
        except (OSError, ValueError):
            return {}

    def _save_seg_meta(self) -> None:
        with FileLock(os.path.join(self._lock_dir, "qunet-segs.lock")):
            merged = {**self._load_seg_meta(), **self._seg_meta}
            fd, tmp = tempfile.mkstemp(dir=self._lock_dir, prefix=".tmp-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(merged, f)
            os.replace(tmp, self._seg_meta_file)

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
                    study, seg = _value(ds, "0020000D"), _value(ds, "0020000E")
                    found = self._seg_info(study, seg)
                    if found:
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

    def _current_label(self, image_id: str) -> tuple[str, str, str] | None:
        """The image's label now: ("seg", SEG uid, study uid), ("local", file, "") for one without a SEG, or None.

        The newest SEG on the server wins. A label saved here without a SEG (no foreground) wins when it is
        newer than every SEG; one saved here whose SEG is gone from the server was deleted there.
        """
        self._fresh()
        segs = self._seg_index().get(image_id, [])
        local = self._datastore.label(image_id, FINAL)
        local_seg = (local.info.get("SeriesInstanceUID") or "") if local else ""
        if segs:
            newest = max(segs, key=lambda s: (s[0], s[1] == local_seg))  # a tie in seconds: the one saved here
            if local and not local_seg and local.info.get("ts", 0) >= newest[0]:
                return "local", LocalDatastore.get_label_uri(self, image_id, FINAL), ""
            return "seg", newest[1], newest[2]
        if local and not local_seg:
            path = LocalDatastore.get_label_uri(self, image_id, FINAL)
            return ("local", path, "") if os.path.exists(path) else None
        return None

    def get_labeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        images = self.list_images()
        return [i for i in images if self._current_label(i)]

    def get_unlabeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        labeled = set(self.get_labeled_images())
        return [i for i in self.list_images() if i not in labeled]

    def get_labels_by_image_id(self, image_id: str) -> dict[str, str]:
        self._fresh()
        found = LocalDatastore.get_labels_by_image_id(self, image_id)
        found.pop(FINAL, None)
        if UID.match(image_id or "") and self._current_label(image_id):
            found[FINAL] = image_id
        return found

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        """A label file on the grid of the image's cached NIfTI; "" when there is none.

        As the local datastore: label id = image id. As the stock DICOMweb class (its `datalist`): with
        `image_id`, `label_id` is a SEG's SeriesInstanceUID.
        """
        if label_tag != FINAL:
            self._fresh()
            return LocalDatastore.get_label_uri(self, label_id, label_tag)
        if image_id:
            self._check_uid(label_id)
            found = [s for s in self._seg_index().get(image_id, []) if s[1] == label_id]
            return self._seg_on_grid(image_id, label_id, found[0][2]) if found else ""
        self._check_uid(label_id)
        current = self._current_label(label_id)
        if not current:
            return ""
        kind, ref, study = current
        return ref if kind == "local" else self._seg_on_grid(label_id, ref, study)

    def _seg_on_grid(self, image_id: str, seg_uid: str, study_uid: str) -> str:
        out = os.path.join(self._grid_dir, f"{seg_uid}.nii.gz")
        if os.path.exists(out):
            return out
        image_file = self.get_image_uri(image_id)
        with FileLock(os.path.join(self._lock_dir, f"{seg_uid}.lock")):
            if os.path.exists(out):
                return out
            seg_dir = os.path.join(self._datastore.label_path(FINAL), seg_uid)
            if not (os.path.isdir(seg_dir) and os.listdir(seg_dir)):
                self._download(study_uid, seg_uid, seg_dir)
            [name] = os.listdir(seg_dir)
            label = self._segments_on(pydicom.dcmread(os.path.join(seg_dir, name)), sitk.ReadImage(image_file))
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

    def save_label(
        self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any], label_id: str = ""
    ) -> str:
        """Check, do the bookkeeping, upload a final label as SEG, then record it; a bad label changes nothing."""
        label_info = dict(label_info or {})
        image_file = self.get_image_uri(image_id)
        converted = ""
        if label_filename.endswith(".bin"):  # OHIF sends the raw voxels of the image's grid
            converted = label_filename = binary_to_image(image_file, label_filename)
        try:
            if label_tag == FINAL:
                source, image_update = prepare_submission(self, image_id, label_filename, label_info)
            else:
                load_label(label_filename, load_stack(image_file))
                source, image_update = label_filename, {}
            try:
                if label_tag == FINAL:
                    info = self.get_image_info(image_id)
                    label_info["SeriesInstanceUID"] = self._upload_seg(image_id, source, label_info)
                    label_info.update({k: info.get(k) for k in ("Modality", "StudyInstanceUID", "DicomPatientID")})
                self._store_label(image_id, source, label_tag, label_info, image_update)
            finally:
                if source != label_filename and os.path.exists(source):
                    os.remove(source)
        finally:
            if converted and os.path.exists(converted):
                os.remove(converted)
        self._forget_segs()
        return image_id

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
            segment = {"name": name, "description": name, "model_name": "QU-net++ label"}  # model_name: SeriesDescription
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

    def _store_label(self, image_id: str, source: str, label_tag: str, label_info: dict, image_update: dict) -> None:
        _, ext = self._to_id(os.path.basename(source))
        name = self._filename(image_id, ext)

        def change() -> None:
            obj = self._datastore.objects.get(image_id)
            if not obj:
                raise ImageNotFoundException(f"Image {image_id} not found")
            label_path = self._datastore.label_path(label_tag)
            os.makedirs(label_path, exist_ok=True)
            previous = obj.labels.get(label_tag)
            if previous and previous.ext != ext:
                stale = os.path.join(label_path, self._filename(image_id, previous.ext))
                if os.path.exists(stale):
                    os.remove(stale)
            atomic_copy(source, os.path.join(label_path, name))
            obj.labels[label_tag] = DataModel(info={**label_info, "ts": int(time.time()), "name": name}, ext=ext)
            obj.image.info.update({k: v for k, v in image_update.items() if not records.in_records(k)})

        with self._lock():  # the SEG is on the server already: its annotated slices are recorded first
            self._set_records(image_id, {k: v for k, v in image_update.items() if records.in_records(k)})
            self._locked_update(change)

    def datalist(self, full_path: bool = True) -> list[dict[str, Any]]:
        """Labelled images with their labels on the image grid (what MONAI Label's stock trainers read)."""
        items = []
        for image_id in self.get_labeled_images():
            label = self.get_label_uri(image_id, FINAL)
            if label:
                items.append({"image": self.get_image_uri(image_id), "label": label})
        return items


def dicomweb_datastore(studies: str, labels: dict[str, int]) -> QUNetDICOMWebDatastore:
    """The datastore for `--studies http(s)://.../dicom-web`, from MONAI Label's settings as its own one reads them."""
    session = None
    if "googleapis.com" in studies:
        from dicomweb_client.ext.gcp.session_utils import create_session_from_gcp_credentials

        client: DICOMwebClient = DICOMwebClient(url=studies, session=create_session_from_gcp_credentials())
    else:
        user = settings.MONAI_LABEL_DICOMWEB_USERNAME or settings.MONAI_LABEL_DATASTORE_USERNAME
        password = settings.MONAI_LABEL_DICOMWEB_PASSWORD or settings.MONAI_LABEL_DATASTORE_PASSWORD
        if user and password:
            from dicomweb_client.session_utils import create_session_from_user_pass

            session = create_session_from_user_pass(user, password)
        client = DICOMwebClientX(
            url=studies,
            session=session,
            qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
            wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
            stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX,
        )
    if not find_seg_tool():  # MONAI Label's own datastore would download dcmqi here; this app never downloads
        logger.warning(f"dcmqi's {SEG_TOOL} is not on PATH: saving final labels will fail (pip install dcmqi)")
    if not settings.MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI:
        logger.warning("MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI=false is ignored: this app reads series as NIfTI")
    cache_path = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or settings.MONAI_LABEL_DATASTORE_CACHE_PATH or "").strip()
    return QUNetDICOMWebDatastore(
        client,
        settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER,
        cache_path=cache_path or None,
        fetch_by_frame=settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME,
        labels=labels,
        list_seconds=settings.MONAI_LABEL_DICOMWEB_CACHE_EXPIRY,
    )
