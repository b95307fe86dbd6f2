"""Fixtures shared by the test modules."""

import os
import tempfile
from pathlib import Path

import pytest

from live_server import APP, SAMPLES
from orthanc import orthanc_server  # noqa: F401 (a real Orthanc with DICOMweb, one per test module that asks)

# What a user's own server writes into the checkout: the suite must neither read nor change any of it.
CHECKOUT_STATE = (
    APP / "model",
    APP / "logs",
    SAMPLES / "labels",
    SAMPLES / "datastore_v2.json",
    *(SAMPLES / f"qunet_records.sqlite{end}" for end in ("", "-wal", "-shm")),
)


def _snapshot() -> dict[str, tuple[int, int]]:
    files: dict[str, tuple[int, int]] = {}
    for top in CHECKOUT_STATE:
        paths = [top] if top.is_file() else [Path(d) / f for d, _, names in os.walk(top) for f in names]
        for p in paths:
            st = p.stat()
            files[str(p)] = (st.st_size, st.st_mtime_ns)
    return files


@pytest.fixture(scope="session", autouse=True)
def checkout_state_untouched():
    """Fails the session if any test created, changed or removed the checkout's model, logs or records."""
    before = _snapshot()
    yield
    after = _snapshot()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"the tests changed the checkout's own state: {changed[:10]}"


@pytest.fixture
def system_tmp(tmp_path, monkeypatch) -> Path:
    """A folder of the test's own as the system's temporary folder (TMPDIR for subprocesses, `tempfile` for this
    process and the children it forks), so that the test sees what the code leaves there."""
    folder = tmp_path / "system-tmp"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder
