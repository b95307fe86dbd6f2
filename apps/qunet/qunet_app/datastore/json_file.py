"""The datastore JSON shared between processes: one lock, reload when another process replaced it, atomic writes.

Scoring and training run in subprocesses that write the same datastore JSON as the server. MONAI Label's
LocalDatastore truncates and rewrites the file in place (a kill mid-write loses every record) and writes its own
in-memory copy (another process's update is lost). Here every write reloads the file under the lock (one lock per
datastore: a file lock between processes, reentrant within one), applies the change and replaces the file
atomically (temporary file, fsync, rename).
"""

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

from filelock import FileLock
from monailabel.datastore.local import LocalDatastoreModel

from qunet_app.datastore.files import atomic_write

logger = logging.getLogger(__name__)


class LockedJsonMixin:
    """For QUNetDatastore (before LocalDatastore): the datastore lock, reloads and atomic replaces of the JSON."""

    def __init__(self, *args, **kwargs) -> None:
        self._rlock = threading.RLock()
        self._lock_depth = 0
        self._file_lock: FileLock | None = None
        super().__init__(*args, **kwargs)
        if getattr(self, "_handler", None):  # auto-reload: an atomic replace arrives as a move, not a modify
            self._handler.on_moved = self._on_moved

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """The datastore lock: the file lock (other processes) held once per thread, reentrant within it."""
        with self._rlock:
            if self._lock_depth == 0:
                self._file_lock = FileLock(self._lock_file)
                self._file_lock.acquire()
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
                if self._lock_depth == 0 and self._file_lock is not None:
                    self._file_lock.release()
                    self._file_lock = None

    def _signature(self) -> tuple | None:
        try:
            st = os.stat(self._datastore_config_path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _reload(self) -> None:
        """Re-read the JSON if another process replaced it (caller holds the lock)."""
        sig = self._signature()
        if sig is not None and sig != self._config_ts:
            with open(self._datastore_config_path) as f:
                self._datastore = LocalDatastoreModel.model_validate_json(f.read())
            self._datastore.base_path = self._datastore_path
            self._config_ts = sig

    def _init_from_datastore_file(self, throw_exception: bool = False) -> None:
        try:
            with self._lock():
                self._reload()
        except ValueError as e:
            logger.error(f"cannot read the datastore file {self._datastore_config_path}: {e}")
            if throw_exception:
                raise

    def _fresh(self) -> None:
        if self._signature() != self._config_ts:
            self._init_from_datastore_file()

    def generation(self) -> Any:
        """Changes whenever the JSON's image list, image info or labels may have changed, in this process or
        another (what the SQLite records do not carry): Next sample's kept ranking is rebuilt then. None: unknown."""
        self._fresh()
        return self._config_ts

    def _on_moved(self, event) -> None:
        if event.dest_path == self._datastore_config_path:
            self._init_from_datastore_file()

    def _update_datastore_file(self, lock: bool = True) -> None:
        with self._lock() if lock else contextlib.nullcontext():
            # pydantic's encoder: json.dumps with indent falls back to pure Python, 10x slower on 1,000 volumes
            text = self._datastore.model_dump_json(exclude={"base_path"}, indent=2, fallback=str)
            atomic_write(text, self._datastore_config_path)
            self._config_ts = self._signature()

    def _locked_update(self, change: Callable[[], None]) -> None:
        """Reload, change, write atomically, all under the lock; a change that raises leaves the file as it was."""
        with self._lock():
            self._reload()
            try:
                change()
                self._update_datastore_file(lock=False)
            except BaseException:
                self._config_ts = None  # drop whatever the change did in memory: re-read the file
                self._reload()
                raise
