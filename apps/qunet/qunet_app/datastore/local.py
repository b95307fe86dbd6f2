"""MONAI Label's LocalDatastore with crash-safe writes, no lost updates between processes, and checked input.

- every write of the datastore JSON reloads it under the datastore lock, applies the change and replaces the file
  atomically, so that the scoring and training subprocesses lose no update (qunet_app/datastore/json_file.py);
- a label is saved with a roll-forward journal: its file is copied next to its final place, the JSON records
  the label, its bookkeeping and the pending copy in one atomic write (the commit), then the copy is renamed
  into place and the journal entry cleared. A process killed before the commit leaves the old label and the old
  records; one killed after it leaves a journal entry that the next start (any process opening the datastore)
  completes (qunet_app/datastore/recovery.py), so the label file and its records always agree;
- a submitted label is checked against its image before anything is written, and ids, tags and file types
  from clients are checked (nothing is written outside the studies folder); mistakes raise `qunet_app.server.errors`
  exceptions, which the server answers with a 4xx status and a message naming the problem;
- only regular files inside the studies folder are images or labels: a symlink (or a folder that leads outside)
  is neither listed nor given as a path to read or serve;
- the app's own records (quality and disagreement scores, annotated and served slices: `keys.in_records`)
  are kept in SQLite, not in the JSON (qunet_app/datastore/records.py); a label save journals its records with the
  label, and the completion of a committed save writes them.
"""

import contextlib
import logging
import os
import stat
import time
from pathlib import Path
from typing import Any

from monailabel.config import settings
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag

from qunet.io import StackError, load_stack

from qunet_app.datastore import keys
from qunet_app.datastore.files import FILE_SUFFIXES, atomic_copy, copy_to_tmp, file_suffix, fsync_dir
from qunet_app.datastore.json_file import LockedJsonMixin
from qunet_app.datastore.records import RecordsMixin, same
from qunet_app.datastore.recovery import PENDING, RecoveryMixin
from qunet_app.datastore.submission import check_label, prepare_submission
from qunet_app.server.errors import (
    BadRequest,
    Conflict,
    ImageNotFound,
    LabelNotFound,
    Unprocessable,
    check_name,
    check_tag,
)

logger = logging.getLogger(__name__)


def _suffixes(path: str) -> str:
    return "".join(Path(path).suffixes) or "(none)"


class QUNetDatastore(RecoveryMixin, LockedJsonMixin, RecordsMixin, LocalDatastore):
    max_label: int | None = None  # highest label value a submitted label may hold (the app sets it: its label count)

    # ---- only regular files inside the studies folder ----------------------------------------------------------

    def _inside(self, path: str) -> str:
        """`path` resolved if it is a regular file (or missing) inside the studies folder, else "" (a symlink, a
        folder, a device, or a path that leads outside)."""
        root = os.path.realpath(self._datastore_path)
        try:
            real = os.path.realpath(path)
            regular = stat.S_ISREG(os.lstat(path).st_mode)
        except FileNotFoundError:
            regular = True  # missing: the caller reports it
        except (OSError, ValueError):  # e.g. a name too long, a NUL byte
            return ""
        return real if regular and os.path.commonpath([real, root]) == root else ""

    def _list_files(self, path, patterns):
        return {k: v for k, v in super()._list_files(path, patterns).items() if self._inside(os.path.join(path, v))}

    def _remove_non_existing(self) -> int:
        removed = super()._remove_non_existing()
        objects = self._datastore.objects
        for image_id in [i for i, obj in objects.items() if not self._image_path(i, obj)]:
            logger.warning(f"dropping image {image_id!r}: not a regular file inside the studies folder")
            del objects[image_id]
            removed += 1
        for image_id, obj in objects.items():
            for tag in [t for t in obj.labels if not self._label_path(image_id, t)]:
                logger.warning(f"dropping label {image_id!r} ({tag}): not a regular file inside the studies folder")
                del obj.labels[tag]
                removed += 1
        return removed

    def _image_path(self, image_id: str, obj: ImageLabelModel | None) -> str:
        return (
            self._inside(os.path.join(self._datastore.image_path(), self._filename(image_id, obj.image.ext)))
            if obj
            else ""
        )

    def _label_path(self, label_id: str, label_tag: str) -> str:
        label = self._datastore.label(label_id, label_tag)
        return (
            self._inside(os.path.join(self._datastore.label_path(label_tag), self._filename(label_id, label.ext)))
            if label
            else ""
        )

    def get_image_uri(self, image_id: str) -> str:
        return self._image_path(image_id, self._datastore.objects.get(image_id))

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        return self._label_path(label_id, label_tag)

    # ---- reads -----------------------------------------------------------------------------------------------

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        self._fresh()  # the scoring subprocess may have written since
        info = super().get_image_info(image_id)
        return {**info, **self.records.get(image_id)} if image_id in self._datastore.objects else info

    def get_label_info(self, label_id: str, label_tag: str) -> dict[str, Any]:
        self._fresh()
        return super().get_label_info(label_id, label_tag)

    def final_labelled(self) -> set[str]:
        """The images with a final label, from the JSON: one pass, no file read."""
        self._fresh()
        return {i for i, obj in self._datastore.objects.items() if DefaultLabelTag.FINAL in obj.labels}

    # ---- writes ----------------------------------------------------------------------------------------------

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        """The app's records go to SQLite (one small transaction); anything else to the datastore JSON, which is
        rewritten only when it changes."""
        kept = {k: v for k, v in info.items() if keys.in_records(k)}
        rest = {k: v for k, v in info.items() if k not in kept}
        with self._lock():  # one writer at a time, also across the records: a label save reads, then writes them
            self._reload()
            obj = self._datastore.objects.get(image_id)
            if not obj:
                raise ImageNotFound(image_id)
            self._set_records(image_id, kept)
            if all(k in obj.image.info and same(obj.image.info[k], v) for k, v in rest.items()):
                return

            def change() -> None:
                obj = self._datastore.objects.get(image_id)
                if not obj:
                    raise ImageNotFound(image_id)
                obj.image.info.update(rest)

            self._locked_update(change)

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        def change() -> None:
            label = self._datastore.label(label_id, label_tag)
            if not label:
                raise LabelNotFound(label_id, label_tag)
            label.info.update(info)

        self._locked_update(change)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        """Check the label against its image first (a bad upload raises and changes nothing), then store it with
        its annotated slices in one locked, journalled update (see the module docstring)."""
        label_tag = check_tag(label_tag or DefaultLabelTag.FINAL.value)
        if label_info is None:
            label_info = {}
        if not isinstance(label_info, dict):
            raise BadRequest(f"label params must be a JSON object, got {type(label_info).__name__}")
        ext = file_suffix(label_filename)
        if not ext:
            raise Unprocessable(
                f"label for {image_id!r}: file type {_suffixes(label_filename)!r} is not supported; "
                f"send one of {', '.join(FILE_SUFFIXES)}"
            )
        with self._lock():  # the bookkeeping below is read and written as one step, whichever process writes
            self._reload()
            if image_id not in self._datastore.objects:
                raise ImageNotFound(image_id)
            if label_tag == DefaultLabelTag.FINAL:
                # a merged label is written beside the labels, where the next start sweeps it if this process dies
                scratch = self._datastore.label_path(label_tag)
                os.makedirs(scratch, exist_ok=True)
                source, image_update = prepare_submission(self, image_id, label_filename, label_info, scratch)
            else:
                check_label(self, image_id, label_filename)
                source, image_update = label_filename, {}
            try:
                self._store(image_id, source, label_tag, label_info, ext, image_update)
            finally:
                if source != label_filename and os.path.exists(source):
                    os.remove(source)
        logger.info(f"saved label {image_id!r} ({label_tag}); image info update: {sorted(image_update)}")
        return image_id

    def _store(
        self, image_id: str, source: str, label_tag: str, label_info: dict, ext: str, image_update: dict
    ) -> None:
        name = self._filename(image_id, ext)

        def change() -> None:
            obj = self._datastore.objects.get(image_id)
            if not obj:
                raise ImageNotFound(image_id)
            folder = self._datastore.label_path(label_tag)
            os.makedirs(folder, exist_ok=True)
            previous = obj.labels.get(label_tag)
            stale = self._filename(image_id, previous.ext) if previous and previous.ext != ext else None
            tmp = copy_to_tmp(source, folder)
            try:
                info = {**label_info, "ts": int(time.time()), "name": name}
                kept = self._records_update(image_id, {k: v for k, v in image_update.items() if keys.in_records(k)})
                pending = {"tmp": os.path.basename(tmp), "stale": stale, "records": kept}
                obj.labels[label_tag] = DataModel(info={**info, PENDING: pending}, ext=ext)
                obj.image.info.update({k: v for k, v in image_update.items() if not keys.in_records(k)})
                self._update_datastore_file(lock=False)  # the commit: from here on a restart completes the save
            except BaseException:
                os.remove(tmp)
                raise
            os.replace(tmp, os.path.join(folder, name))
            fsync_dir(folder)
            if stale:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(folder, stale))
            self._set_records(image_id, kept)
            obj.labels[label_tag].info.pop(PENDING, None)  # written by _locked_update

        self._locked_update(change)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        """Delete a label and, for the final one, the slices it annotated (they are open for annotation again)."""

        def change() -> None:
            obj = self._datastore.objects.get(label_id)
            label = obj.labels.get(label_tag) if obj else None
            if not label:
                raise LabelNotFound(label_id, label_tag)
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self._datastore.label_path(label_tag), self._filename(label_id, label.ext)))
            del obj.labels[label_tag]

        with self._lock():
            self._locked_update(change)
            if label_tag == DefaultLabelTag.FINAL:  # a kill before this line: the next start drops them
                self.records.delete(label_id, (keys.ANNOTATED, keys.DISAGREEMENT))  # Q was computed without them

    def remove_image(self, image_id: str) -> None:
        def change() -> None:
            obj = self._datastore.objects.get(image_id)
            if not obj:
                raise ImageNotFound(image_id)
            for tag, label in obj.labels.items():
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(self._datastore.label_path(tag), self._filename(image_id, label.ext)))
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self._datastore.image_path(), self._filename(image_id, obj.image.ext)))
            del self._datastore.objects[image_id]

        with self._lock():
            self._locked_update(change)
            self.records.delete(image_id)  # a kill before this line: the next start drops them

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        """A new image (PUT /datastore/image): a safe id, a 3D stack we can read, never replacing a stored one."""
        ext = file_suffix(image_filename)
        if not ext:
            raise Unprocessable(
                f"image file type {_suffixes(image_filename)!r} is not supported; "
                f"send one of {', '.join(FILE_SUFFIXES)}"
            )
        image_id = check_name(image_id or Path(image_filename).name[: -len(ext)], "image id")
        if image_info is not None and not isinstance(image_info, dict):
            raise BadRequest(f"image params must be a JSON object, got {type(image_info).__name__}")
        try:
            load_stack(image_filename)
        except StackError as e:
            raise Unprocessable(
                f"image {image_id!r} rejected: {str(e).replace(image_filename, 'the uploaded file')}"
            ) from e
        name = self._filename(image_id, ext)

        def change() -> None:
            if image_id in self._datastore.objects:
                raise Conflict(f"image id {image_id!r} exists already; remove it first to replace it")
            folder = self._datastore.image_path()
            clash = [f for f in os.listdir(folder) if self._to_id(f)[0] == image_id and file_suffix(f)]
            if clash:
                raise Conflict(f"image id {image_id!r} is taken by the file {clash[0]!r}")
            atomic_copy(image_filename, os.path.join(folder, name))
            info = {**(image_info or {}), "ts": int(time.time()), "name": name}
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=ext))

        self._locked_update(change)
        return image_id


def local_datastore(studies: str, auto_reload: bool) -> QUNetDatastore:
    """The app's datastore over a studies folder, with MONAI Label's settings (file types, read-only)."""
    return QUNetDatastore(
        studies,
        extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
        auto_reload=auto_reload,
        read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
    )
