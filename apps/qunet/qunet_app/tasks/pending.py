"""What the scoring methods have left to do, asked after every Next sample (MONAI Label's auto-update scoring),
answered from the records rather than by looking at every image; and the read-only view of every image's info that
scoring and Next sample share."""

import threading
import time
from collections.abc import Callable, Iterator

from monailabel.interfaces.datastore import Datastore

from qunet.io import file_signature

from qunet_app.datastore import keys


def signature_or_none(path: str) -> str | None:
    try:
        return file_signature(path)
    except OSError:
        return None


def infos_read_only(datastore: Datastore) -> Iterator[tuple[str, dict]]:
    """(id, info) of every image, read-only, without LocalDatastore's deep copy of each info: with a thousand scored
    volumes the copies cost more than the rest of Next sample. In id order; an image the datastore lists but has no
    record of yet (a DICOMweb series not fetched) has info {}."""
    image_ids = sorted(datastore.list_images())
    if not callable(getattr(datastore, "image_infos", None)):
        yield from ((i, datastore.get_image_info(i)) for i in image_ids)
        return
    infos = datastore.image_infos()
    yield from ((i, infos.get(i, {})) for i in image_ids)


def _has_work(datastore: Datastore, image_id: str, info: dict, done: Callable[[dict, str], bool], key: str) -> bool:
    """Whether a run would score this image: no up-to-date record, and not known to be bad. No image is read."""
    if not info.get(key) and not info.get(keys.ERROR):
        return True
    path = datastore.get_image_uri(image_id)
    source = signature_or_none(path)
    if source is None or info.get(keys.ERROR) and info.get(keys.ERROR_SOURCE) == source:
        return False
    return not done(info, path)


class PendingImages:
    """The images a scoring method has work on, kept from the records: MONAI Label asks after every Next sample.

    Every image is looked at (a file signature each) when the model or the image list changes, and once every
    FULL_LOOK_SECONDS (an image file replaced in place changes no record); between those, only the images whose
    records changed since the last look, so an answer's question costs the same at 100 or 100,000 volumes."""

    FULL_LOOK_SECONDS = 600.0

    def __init__(self, key: str) -> None:
        self.key = key
        self._lock = threading.Lock()
        self._look: tuple | None = None  # (model, image ids, time) of the last full look
        self._version = 0
        self._todo: set[str] = set()

    def any(self, datastore: Datastore, done: Callable[[dict, str], bool], model: str | None = None) -> bool:
        store = getattr(datastore, "records", None)
        with self._lock:
            ids = set(datastore.list_images())
            if (
                store is None
                or self._look is None
                or self._look[:2] != (model, ids)
                or time.monotonic() - self._look[2] > self.FULL_LOOK_SECONDS
            ):
                self._version = store.version() if store is not None else 0  # first: later changes are seen next time
                self._todo = {
                    i for i, info in infos_read_only(datastore) if _has_work(datastore, i, info, done, self.key)
                }
                self._look = (model, ids, time.monotonic())
                return bool(self._todo)
            self._version, changed = store.changed_since(self._version)
            for image_id in changed & ids:
                if _has_work(datastore, image_id, datastore.get_image_info(image_id), done, self.key):
                    self._todo.add(image_id)
                else:
                    self._todo.discard(image_id)
            return bool(self._todo)
