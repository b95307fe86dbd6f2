"""The app's SQLite record store (qunet.recordstore), as two processes see it: each write is seen by the other's
next read, deletions included; a failed transaction leaves nothing; numpy values are stored as plain JSON."""

import multiprocessing

import numpy as np
import pytest

from qunet.recordstore import RecordStore


def _write_in_child(path: str) -> None:
    RecordStore(path).update("img", {"qunet_served": {"child": {"slices": [1], "ts": 2.0}}})


def test_a_reader_sees_writes_and_deletions_of_another_process(tmp_path):
    path = str(tmp_path / "records.sqlite")
    mine, reader = RecordStore(path), RecordStore(path)
    mine.update("img", {"qunet_annotated": np.array([3, 4]), "qunet_error": None, "score": np.float32(0.5)})
    mine.update("other", {"qunet_quality": {"initial": [0]}})
    version, changed = reader.changed_since(0)
    assert changed == {"img", "other"} and version == reader.version() > 0
    assert reader.get("img") == {"qunet_annotated": [3, 4], "qunet_error": None, "score": 0.5}
    seen = reader.all()
    assert set(seen) == {"img", "other"}

    child = multiprocessing.get_context("fork").Process(target=_write_in_child, args=(path,))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    assert reader.changed_since(version) == (reader.version(), {"img"})  # only the child's write is new
    version = reader.version()
    mine.delete("img", ["qunet_annotated"])
    mine.delete("other")
    assert reader.changed_since(version)[1] == {"img", "other"}  # deletions are changes too
    seen = reader.all()
    assert seen == {"img": {"qunet_error": None, "score": 0.5, "qunet_served": {"child": {"slices": [1], "ts": 2.0}}}}
    assert RecordStore(path).all() == seen  # a fresh reader builds the same view from scratch


def test_a_failed_transaction_leaves_nothing(tmp_path):
    store = RecordStore(str(tmp_path / "records.sqlite"))
    store.update("img", {"qunet_annotated": [1]})
    with pytest.raises(RuntimeError), store.transaction():
        store.update("img", {"qunet_annotated": [1, 2]})
        store.update("new", {"qunet_annotated": [5]})
        raise RuntimeError("killed halfway")
    assert store.all() == {"img": {"qunet_annotated": [1]}}
    assert RecordStore(store.path).all() == {"img": {"qunet_annotated": [1]}}
    store.add_missing({"img": {"qunet_annotated": [9], "qunet_quality": {}}})  # never replaces a record
    assert store.get("img") == {"qunet_annotated": [1], "qunet_quality": {}}
