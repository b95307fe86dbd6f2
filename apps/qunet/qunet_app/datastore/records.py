"""The app's own records (`keys.in_records` keys) in SQLite beside MONAI Label's datastore JSON.

Every Next sample and every scored volume changes them: in the JSON each change rewrote, and every other process
re-read, the whole file (a cohort's start-up grew with the square of its size). Here each change is one small
transaction (qunet.recordstore). Image info read through the datastore is the JSON's info with the records on top,
so callers see one dict as before. The datastore's own lock is held around every write, as for the JSON.
"""

import logging
import os
import time
from collections.abc import Mapping
from functools import cached_property
from typing import Any

from monailabel.interfaces.datastore import DefaultLabelTag

from qunet.recordstore import RecordStore

from qunet_app.datastore import keys

logger = logging.getLogger(__name__)


def same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except (TypeError, ValueError):  # e.g. arrays, whose == is elementwise
        return False


class RecordsMixin:
    """For QUNetDatastore: the records store, its migration and clean-up, and merged reads."""

    hold_seconds: float | None = None  # how long a served-slice record holds its slices (the app sets it)
    _forgets_labels = True  # a removed label file removes its annotated slices (not for DICOMweb: labels live there)

    @cached_property
    def records(self) -> RecordStore:
        """The app's per-image records (`keys.in_records` keys), next to the datastore JSON. Opened on first use:
        LocalDatastore's constructor already reconciles, which migrates keys."""
        return RecordStore(os.path.join(self._datastore_path, keys.RECORDS_FILE))

    def _migrate_records(self) -> None:
        """Records an earlier version kept in the JSON's image info move to the SQLite records (kept there if both
        have one: a migration interrupted after the first step runs again without undoing later changes)."""
        moving = {
            i: {k: v for k, v in obj.image.info.items() if keys.in_records(k)}
            for i, obj in self._datastore.objects.items()
        }
        moving = {i: found for i, found in moving.items() if found}
        if moving:
            self.records.add_missing(moving)
            for image_id, found in moving.items():
                for key in found:
                    del self._datastore.objects[image_id].image.info[key]
            self._update_datastore_file(lock=False)
            logger.warning(
                f"moved the records of {len(moving)} image(s) from the datastore JSON to {keys.RECORDS_FILE}"
            )

    def _drop_stale_records(self) -> None:
        """Records of images no longer in the datastore, and annotated slices (with the Q computed without them)
        of images whose final label is gone (a removal killed between its two writes)."""
        objects = self._datastore.objects
        for image_id, values in list(self.records.all().items()):
            obj = objects.get(image_id)
            if obj is None:
                self.records.delete(image_id)
            elif keys.ANNOTATED in values and DefaultLabelTag.FINAL not in obj.labels and self._forgets_labels:
                self.records.delete(image_id, (keys.ANNOTATED, keys.DISAGREEMENT))

    def _records_update(self, image_id: str, update: Mapping[str, Any]) -> dict[str, Any]:
        """The records of `update` that change something, pruning the served-slice records it writes (never the
        ones this update changes)."""
        current = self.records.all().get(image_id, {})
        update = {k: v for k, v in update.items() if not (k in current and same(current[k], v))}
        served = update.get(keys.SERVED)
        if self.hold_seconds is not None and isinstance(served, dict):
            old = current.get(keys.SERVED) or {}
            written = {k for k, v in served.items() if not same(old.get(k), v)}
            update[keys.SERVED] = keys.pruned_served(served, time.time(), self.hold_seconds, written)
        return update

    def _set_records(self, image_id: str, update: Mapping[str, Any]) -> None:
        with self.records.transaction():
            self.records.update(image_id, self._records_update(image_id, update))

    def image_infos(self) -> dict[str, dict[str, Any]]:
        """Every stored image's info with its records, read-only (the values are shared with the caches)."""
        self._fresh()
        kept = self.records.all()
        return {i: {**obj.image.info, **kept.get(i, {})} for i, obj in self._datastore.objects.items()}

    def json(self) -> dict[str, Any]:
        """GET /datastore?output=all: the stored objects, each image's info with its keys."""
        out = super().json()
        for image_id, values in self.records.all().items():
            if image_id in out["objects"]:
                out["objects"][image_id]["image"]["info"].update(values)
        return out
