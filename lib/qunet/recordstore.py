"""Per-image records in SQLite: crash-safe, shared by the server and its scoring and training subprocesses.

The app's own records (quality, disagreement, annotated and served slices) change on every Next sample and every
scored volume. In one JSON file each change rewrote (and every other process re-read) the whole file, so a cohort's
start-up grew with the square of its size. Here each change is one small transaction (WAL mode, synchronous FULL:
a committed change survives a SIGKILL or a power cut), and readers keep a decoded copy that they bring up to date
from the rows changed since they last looked (each write takes the next `version`, indexed).

A value is any JSON value; a deleted key is kept as a row with a NULL value so that readers also see deletions.
"""

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    image TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT,
    version INTEGER NOT NULL,
    PRIMARY KEY (image, key)
);
CREATE INDEX IF NOT EXISTS records_version ON records (version);
"""


def _encode(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=_plain)


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as their Python values (scores are computed with numpy)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not a JSON value")


class RecordStore:
    """{image id: {key: value}} in an SQLite file; safe across threads and processes."""

    def __init__(self, path: str, timeout: float = 60.0) -> None:
        self.path = path
        self._lock = threading.RLock()  # one connection per store object, used by one thread at a time
        self._db = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._cache: dict[str, dict[str, Any]] = {}
        self._seen = 0  # highest version read into the cache
        self._depth = 0

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _refresh(self) -> None:
        rows = self._db.execute(
            "SELECT image, key, value, version FROM records WHERE version > ? ORDER BY version", (self._seen,)
        ).fetchall()
        for image, key, value, version in rows:
            entry = dict(self._cache.get(image, {}))  # copied, not changed in place: a returned view stays as it was
            if value is None:
                entry.pop(key, None)
            else:
                entry[key] = json.loads(value)
            if entry:
                self._cache[image] = entry
            else:
                self._cache.pop(image, None)
            self._seen = version

    def get(self, image: str) -> dict[str, Any]:
        """A copy of one image's records ({} when it has none)."""
        with self._lock:
            self._refresh()
            return json.loads(json.dumps(self._cache.get(image, {})))

    def all(self) -> Mapping[str, dict[str, Any]]:
        """Every image's records, up to date: a view that later writes leave as it is; read-only (the records
        themselves are not copied: Next sample reads thousands)."""
        with self._lock:
            self._refresh()
            return dict(self._cache)

    def version(self) -> int:
        """The version of the latest change (0: none yet)."""
        with self._lock:
            self._refresh()
            return self._seen

    def changed_since(self, version: int) -> tuple[int, set[str]]:
        """(the latest version, the images with a change after `version`): a reader that keeps something derived
        from the records updates only those (the next call passes the version returned)."""
        with self._lock:
            self._refresh()
            rows = self._db.execute(
                "SELECT image FROM records WHERE version > ?", (version,)
            ).fetchall()  # the version index
            return self._seen, {image for (image,) in rows}

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """A write transaction (reentrant): other writers wait; reads inside it see the latest records."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            self._db.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                self._refresh()
                yield
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                self._seen, self._cache = 0, {}  # what this transaction cached is gone: read everything again
                raise
            finally:
                self._depth = 0
            self._refresh()

    def _write(self, rows: Iterable[tuple[str, str, str | None]], only_new: bool = False) -> None:
        verb = "INSERT OR IGNORE" if only_new else "INSERT OR REPLACE"
        with self.transaction():
            (version,) = self._db.execute("SELECT COALESCE(MAX(version), 0) FROM records").fetchone()
            self._db.executemany(
                f"{verb} INTO records (image, key, value, version) VALUES (?, ?, ?, ?)",
                [(image, key, value, version + 1) for image, key, value in rows],
            )

    def update(self, image: str, values: Mapping[str, Any]) -> None:
        """Set keys of one image (a JSON null is a value; use `delete` to remove a key)."""
        if values:
            self._write([(image, k, _encode(v)) for k, v in values.items()])

    def add_missing(self, records: Mapping[str, Mapping[str, Any]]) -> None:
        """Keys that have no row yet, for many images at once (a migration that may run twice)."""
        self._write(
            [(image, k, _encode(v)) for image, values in records.items() for k, v in values.items()], only_new=True
        )

    def delete(self, image: str, keys: Iterable[str] | None = None) -> None:
        """Remove some keys of an image, or all of them."""
        with self.transaction():
            present = self._cache.get(image, {})
            gone = [k for k in (present if keys is None else keys) if k in present]
            if gone:
                self._write([(image, k, None) for k in gone])
