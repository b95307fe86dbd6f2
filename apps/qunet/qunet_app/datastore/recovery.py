"""Start-up of the datastore: finish or drop what a killed process left.

A label save (`QUNetDatastore._store`) is journalled: the JSON's atomic write that records the label also records,
under `PENDING` in its info, the temporary copy still to be renamed into place, the stale file to delete and the
app's records to write. The next start (any process opening the datastore) completes such a save, but only for an
entry the app wrote (its own temporary name, the same image's files, the app's own record keys), so that the label
file and its records always agree; it also removes the temporary files of interrupted writes.
"""

import contextlib
import logging
import os
from typing import Any

from qunet_app.datastore import keys
from qunet_app.datastore.files import FILE_SUFFIXES, TMP_NAME, TMP_PREFIX, fsync_dir

logger = logging.getLogger(__name__)

PENDING = "qunet_pending"  # label info: {"tmp": copy waiting to be renamed into place, "stale": file to delete}


class RecoveryMixin:
    """For QUNetDatastore (before LocalDatastore): the start-up reconciliation, with pending saves completed."""

    def _reconcile_datastore(self) -> None:
        with self._lock():
            self._reload()
            self._migrate_records()
            self._recover()
            super()._reconcile_datastore()
            self._drop_stale_records()

    def _recover(self) -> None:
        """Complete label saves that were committed when their process died; remove orphaned temporary files."""
        changed = False
        for image_id, obj in self._datastore.objects.items():
            for tag, label in obj.labels.items():
                if PENDING not in label.info:
                    continue
                folder = self._datastore.label_path(tag)
                found = self._pending_files(image_id, label.info[PENDING])
                if found is None:
                    logger.warning(
                        f"ignored a pending save of label {image_id!r} ({tag}) the app did not write: "
                        f"{str(label.info[PENDING])[:200]}"
                    )
                else:
                    tmp, stale, pending_records = found
                    self._set_records(image_id, pending_records)
                    if os.path.isfile(os.path.join(folder, tmp)):
                        os.replace(os.path.join(folder, tmp), os.path.join(folder, self._filename(image_id, label.ext)))
                        fsync_dir(folder)
                        logger.warning(f"completed the interrupted save of label {image_id!r} ({tag})")
                    if stale and stale != self._filename(image_id, label.ext):
                        with contextlib.suppress(FileNotFoundError):
                            os.remove(os.path.join(folder, stale))
                label.info.pop(PENDING, None)
                changed = True
        if changed:
            self._update_datastore_file(lock=False)
        folders = [self._datastore_path, self._datastore.label_path(None)]
        labels_dir = self._datastore.label_path(None)
        if os.path.isdir(labels_dir):
            folders += [os.path.join(labels_dir, d) for d in os.listdir(labels_dir)]
        for folder in folders:
            if os.path.isdir(folder):
                for name in os.listdir(folder):
                    if name.startswith(TMP_PREFIX):
                        logger.warning(f"removing {os.path.join(folder, name)}, left by an interrupted write")
                        with contextlib.suppress(OSError):
                            os.remove(os.path.join(folder, name))

    def _pending_files(self, image_id: str, pending: Any) -> tuple[str, str | None, dict] | None:
        """(temporary copy, stale file, records) of a pending save if the entry is one `_store` writes: a temporary
        name of ours, a stale file of this same image, the app's own keys. None for anything else (it would move
        or delete another file, or write other records)."""
        if (
            not isinstance(pending, dict)
            or not isinstance(pending.get("tmp"), str)
            or not TMP_NAME.fullmatch(pending["tmp"])
        ):
            return None
        stale, pending_records = pending.get("stale"), pending.get("records", {})
        if stale is not None and stale not in {self._filename(image_id, ext) for ext in FILE_SUFFIXES}:
            return None
        if not isinstance(pending_records, dict) or not all(map(keys.in_records, pending_records)):
            return None
        return pending["tmp"], stale, pending_records
