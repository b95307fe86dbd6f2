"""MONAI Label's LocalDatastore with crash-safe writes and no lost updates between processes.

Scoring and training run in subprocesses that write the same datastore JSON as the server. The stock
class truncates and rewrites the file in place (a kill mid-write loses every record) and writes its own
in-memory copy (another process's update is lost). Here every write reloads the file under the lock,
applies the change, and replaces the file atomically; label files are replaced atomically too.
"""

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

from filelock import FileLock
from monailabel.datastore.local import DataModel, LocalDatastore, LocalDatastoreModel
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.exception import ImageNotFoundException, LabelNotFoundException

from qunet.io import load_label, load_stack

from lib.submission import prepare_submission


def atomic_copy(src: str, dest: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=".tmp-")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class QUNetDatastore(LocalDatastore):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if getattr(self, "_handler", None):  # auto-reload: an atomic replace arrives as a move, not a modify
            self._handler.on_moved = self._on_moved

    def _on_moved(self, event) -> None:
        if event.dest_path != self._datastore_config_path:
            return
        if self._ignore_event_config:  # our own write
            self._ignore_event_config = False
            return
        self._init_from_datastore_file()

    def _reload(self) -> None:
        """Re-read the JSON if another process changed it (caller holds the lock)."""
        path = self._datastore_config_path
        if os.path.exists(path) and os.stat(path).st_mtime != self._config_ts:
            with open(path) as f:
                self._datastore = LocalDatastoreModel.model_validate_json(f.read())
            self._datastore.base_path = self._datastore_path
            self._config_ts = os.stat(path).st_mtime

    def _update_datastore_file(self, lock: bool = True) -> None:
        def write() -> None:
            self._ignore_event_config = True
            text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            fd, tmp = tempfile.mkstemp(dir=self._datastore_path, prefix=".tmp-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._datastore_config_path)
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()

    def _locked_update(self, change: Callable[[], None]) -> None:
        with FileLock(self._lock_file):
            self._reload()
            change()
            self._update_datastore_file(lock=False)

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        def change() -> None:
            obj = self._datastore.objects.get(image_id)
            if not obj:
                raise ImageNotFoundException(f"Image {image_id} not found")
            obj.image.info.update(info)

        self._locked_update(change)

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        def change() -> None:
            label = self._datastore.label(label_id, label_tag)
            if not label:
                raise LabelNotFoundException(f"Label: {label_id} Tag: {label_tag} not found")
            label.info.update(info)

        self._locked_update(change)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        """Check the label against its image first (a bad upload raises StackError and changes nothing), then
        store it together with its annotated slices in one locked, atomic update."""
        if image_id not in self._datastore.objects:
            raise ImageNotFoundException(f"Image {image_id} not found")
        label_info = label_info or {}
        if label_tag == DefaultLabelTag.FINAL:
            source, image_update = prepare_submission(self, image_id, label_filename, label_info)
        else:
            load_label(label_filename, load_stack(self.get_image_uri(image_id)))
            source, image_update = label_filename, {}
        _, label_ext = self._to_id(os.path.basename(label_filename))
        name = self._filename(image_id, label_ext)

        def change() -> None:
            obj = self._datastore.objects.get(image_id)
            if not obj:
                raise ImageNotFoundException(f"Image {image_id} not found")
            label_path = self._datastore.label_path(label_tag)
            os.makedirs(label_path, exist_ok=True)
            previous = obj.labels.get(label_tag)
            if previous and previous.ext != label_ext:  # a label in another format replaces the old one
                stale = os.path.join(label_path, self._filename(image_id, previous.ext))
                if os.path.exists(stale):
                    os.remove(stale)
            atomic_copy(source, os.path.join(label_path, name))
            obj.labels[label_tag] = DataModel(info={**label_info, "ts": int(time.time()), "name": name}, ext=label_ext)
            obj.image.info.update(image_update)

        try:
            self._locked_update(change)
        finally:
            if source != label_filename:
                os.remove(source)
        return image_id
