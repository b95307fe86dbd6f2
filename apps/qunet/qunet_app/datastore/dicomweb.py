"""MONAI Label's DICOMweb datastore (`--studies http://.../dicom-web`) with the app's label checks and bookkeeping.

MONAI Label keeps a DICOMweb server's images as series (image id = SeriesInstanceUID), converts a series to a
cached NIfTI when it is needed, and stores a final label back on the server as a DICOM SEG made by dcmqi's
`itkimage2segimage`. Its local cache folder also holds a datastore JSON with the image info where the app
keeps its records (quality, disagreement, served and annotated slices). On top of the stock class:

- `save_label` checks the label against the image and does the annotated-slice bookkeeping first
  (`qunet_app.datastore.submission.prepare_submission`, as the local datastore does), then uploads the merged label as a
  SEG whose segments are named after the app's labels, then records label and image info in one locked,
  atomic update. A label with no foreground (all served slices negative) has no SEG (dcmqi cannot write
  one); it is kept in the cache only.
- `get_label_uri(image, "final")` gives the newest label of the image ON THE IMAGE'S GRID (a SEG read back is
  resampled onto the cached image: qunet_app/datastore/dicomweb_seg.py). The newest SEG on the server wins, so a SEG
  made
  elsewhere (another server, a viewer) is picked up.
- Image info is re-read from the JSON before each read, so the server sees what its scoring and training
  subprocesses wrote, and every write is a locked reload-change-replace (from `QUNetDatastore`).
- Which series are images, their download and their NIfTI cache: qunet_app/datastore/dicomweb_series.py.
"""

import logging
import os
import threading
import time
from typing import Any

from cachetools import TTLCache
from dicomweb_client import DICOMwebClient
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.datastore.local import DataModel, LocalDatastore
from monailabel.datastore.utils.convert import binary_to_image
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.exception import ImageNotFoundException

from qunet.io import load_label, load_stack

from qunet_app.datastore import keys
from qunet_app.datastore.dicomweb_seg import SEG_INDEX_SECONDS, SEG_TOOL, DicomSegMixin, find_seg_tool
from qunet_app.datastore.dicomweb_series import UID, SeriesCacheMixin
from qunet_app.datastore.files import atomic_copy
from qunet_app.datastore.local import QUNetDatastore, local_datastore
from qunet_app.datastore.submission import prepare_submission
from qunet_app.settings import AppConf

logger = logging.getLogger(__name__)

FINAL = DefaultLabelTag.FINAL.value


class QUNetDICOMWebDatastore(DicomSegMixin, SeriesCacheMixin, DICOMWebDatastore, QUNetDatastore):
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
        super().__init__(
            client, search_filter, cache_path=cache_path, fetch_by_frame=fetch_by_frame, convert_to_nifti=True
        )
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

    # ---- labels: SEG series on the server, converted back onto the image grid ---------------------------------

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

    def save_label(
        self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any], label_id: str = ""
    ) -> str:
        """Check, do the bookkeeping, upload a final label as SEG, then record it; a bad label changes nothing."""
        label_info = dict(label_info or {})
        image_file = self.get_image_uri(image_id)
        converted, scratch = "", os.path.dirname(os.path.abspath(label_filename))
        if label_filename.endswith(".bin"):  # OHIF sends the raw voxels of the image's grid
            converted = label_filename = binary_to_image(image_file, label_filename)
        try:
            if label_tag == FINAL:
                # a merged label goes beside the submitted one: the request's upload folder (qunet_app.server.uploads),
                # removed
                # with it and swept after a crash (no datastore lock is held here to protect a shared folder)
                source, image_update = prepare_submission(self, image_id, label_filename, label_info, scratch)
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
            obj.image.info.update({k: v for k, v in image_update.items() if not keys.in_records(k)})

        with self._lock():  # the SEG is on the server already: its annotated slices are recorded first
            self._set_records(image_id, {k: v for k, v in image_update.items() if keys.in_records(k)})
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


def open_studies(studies: str, conf: AppConf, auto_reload: bool = False) -> QUNetDatastore:
    """The app's datastore for `--studies`: a DICOMweb server (series are images, final labels go back as DICOM
    SEG) for an http(s) URL, else a folder of files (NIfTI, NRRD, ...)."""
    if studies.startswith(("http://", "https://")):
        return dicomweb_datastore(studies.rstrip("/").strip(), conf.label_map())
    return local_datastore(studies, auto_reload)
