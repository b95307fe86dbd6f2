"""Faults: a process killed at any point of a label save or a model publish loses nothing that was acknowledged and
leaves nothing half-written (a whole server SIGKILLed while it saves, scores and trains: test_kill_restart.py).

- `test_label_save_killed_at_every_step`: a child process saving a label is killed (os._exit) at each step of
  the journalled save; reopening the datastore (as a restart does) gives either the old label and records or
  the new ones, never a mix, and no temporary files, in the studies folder or outside it.
- `test_model_publish_killed_mid_copy_keeps_the_previous_model`: the same for the model training publishes.
"""

import json
import multiprocessing
import os
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from live_server import APP, records_on_disk
from qunet import build_network
from qunet.io import load_label, load_stack
from stacks import write_label, write_stack

TINY = (4, 4, 8, 8, 16, 4)


def app_lib():
    if str(APP) not in sys.path:
        sys.path.insert(0, str(APP))
    from qunet_app.datastore import keys as records
    from qunet_app.datastore.local import QUNetDatastore

    return QUNetDatastore, records


def open_store(studies: Path):
    QUNetDatastore, _ = app_lib()
    return QUNetDatastore(str(studies), extensions=["*.nii.gz"], auto_reload=False)


def stored(studies: Path, image_id: str) -> dict:
    """What a restarted server would see: the label (or None), its record and the annotated slices."""
    _, records = app_lib()
    store = open_store(studies)
    uri = store.get_label_uri(image_id, "final")
    label = load_label(uri, load_stack(store.get_image_uri(image_id))) if uri else None
    info = store.get_image_info(image_id)
    return {
        "label": label,
        "record": store.get_label_info(image_id, "final"),
        "annotated": info.get(records.ANNOTATED),
        "files": sorted(
            p.name
            for p in studies.rglob("*")
            if p.is_file() and p.name != ".lock" and not p.name.startswith(records.RECORDS_FILE)
        ),
    }


def copy_then_die(keep: int):
    """A shutil.copyfile that writes the first `keep` bytes and kills the process: a crash mid-copy."""

    def copyfile(src, dst, **kw):
        with open(src, "rb") as f, open(dst, "wb") as g:
            g.write(f.read()[:keep])
        os._exit(9)

    return copyfile


def _save_and_die(
    studies: str, image_id: str, label_file: str, slices: list[int], kill_at: int, truncate: bool
) -> None:
    """Child: save a label, exiting abruptly at the `kill_at`-th rename (or mid-copy when `truncate`)."""
    store = open_store(Path(studies))
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        if len(calls) == kill_at:
            os._exit(9)
        calls.append(dst)
        return real_replace(src, dst)

    os.replace = replace
    if truncate:
        shutil.copyfile = copy_then_die(100)
    store.save_label(image_id, label_file, "final", {"annotated_slices": slices, "client_id": "k"})
    os._exit(0)


@pytest.mark.parametrize("first", [True, False], ids=["first-label", "second-label"])
def test_label_save_killed_at_every_step(tmp_path, system_tmp, first):
    template = tmp_path / "template"
    template.mkdir()
    write_stack(template / "img.nii.gz")
    shape = nib.load(template / "img.nii.gz").shape
    old_label = write_label(tmp_path / "old.nii.gz", shape, [1, 2], 4)
    new_label = write_label(tmp_path / "new.nii.gz", shape, [5], 7)
    if not first:
        open_store(template).save_label("img", str(tmp_path / "old.nii.gz"), "final", {"annotated_slices": [1, 2]})
    before = stored(template, "img")

    after_commit = {"label": None}
    ctx = multiprocessing.get_context("fork")
    # renames in a save: 0 the JSON commit, 1 the label into place, 2 the JSON clearing the journal; 3 = no kill
    for kill_at, truncate in [(0, True), (0, False), (1, False), (2, False), (3, False)]:
        studies = tmp_path / f"studies-{kill_at}-{truncate}"
        shutil.copytree(template, studies)
        child = ctx.Process(
            target=_save_and_die, args=(str(studies), "img", str(tmp_path / "new.nii.gz"), [5], kill_at, truncate)
        )
        child.start()
        child.join(60)
        assert child.exitcode == (0 if kill_at == 3 else 9)
        now = stored(studies, "img")  # reopening recovers: completes a committed save, drops the rest
        assert not [f for f in now["files"] if f.startswith(".tmp-")], now["files"]
        assert not list(system_tmp.iterdir()), f"killed at rename {kill_at}: left outside the studies folder"
        json.loads((studies / "datastore_v2.json").read_text())
        if kill_at == 0:  # before the commit: exactly the old state
            assert now["annotated"] == before["annotated"] and now["files"] == before["files"]
            assert (now["label"] is None) == first
            if not first:
                assert np.array_equal(now["label"], before["label"])
            continue
        # after the commit: the new label, merged with the old slices, and its records, complete
        expected = new_label.copy()
        if not first:
            expected[:, :, [1, 2]] = old_label[:, :, [1, 2]]
        assert np.array_equal(now["label"], expected), f"killed at rename {kill_at}"
        assert now["annotated"] == ([5] if first else [1, 2, 5])
        assert "qunet_pending" not in now["record"] and now["record"]["annotated_slices"] == [5]
        if after_commit["label"] is None:
            after_commit = now
        assert now["files"] == after_commit["files"]


def test_info_update_rewrites_the_file_only_for_a_change(tmp_path):
    """Each write replaces the whole datastore JSON (1,000 volumes: megabytes); an update that changes nothing
    leaves the file alone, and the app's own records never touch it. What is written reads back the same, also
    from another process's view."""
    write_stack(tmp_path / "img.nii.gz")
    store = open_store(tmp_path)
    path = tmp_path / "datastore_v2.json"
    info = {
        "qunet_served": {"a": {"slices": [3, 1], "ts": 5}},
        "score": np.float32(0.5),
        "q": [0.25, None],
        "array": np.arange(3),
    }

    def version() -> tuple[int, int]:
        st = os.stat(path)
        return st.st_ino, st.st_mtime_ns

    first = version()
    store.update_image_info("img", info)
    written = version()
    assert written != first
    store.update_image_info("img", {k: v for k, v in info.items() if k != "array"})
    assert version() == written
    store.update_image_info("img", info)  # an array is never compared equal: written again
    assert version() != written
    written = version()
    store.update_image_info("img", {"q": [0.25, 0.5]})
    assert version() != written
    written = version()
    served = {"b": {"slices": [np.int64(7)], "ts": 6.5}}  # the app's records (every Next sample): not in the JSON
    store.update_image_info("img", {"qunet_served": served, "strategy": {"qunet": {"ts": 6}}})
    assert version() == written and "qunet_served" not in path.read_text()
    json.loads(path.read_text())
    again = open_store(tmp_path).get_image_info("img")
    assert again["qunet_served"] == {"b": {"slices": [7], "ts": 6.5}} and again["q"] == [0.25, 0.5]
    assert again["strategy"] == {"qunet": {"ts": 6}}
    assert float(again["score"]) == 0.5 and again["array"] == "[0 1 2]"  # JSON has no type for them: their text


def test_records_move_out_of_the_json_once(tmp_path):
    """A datastore written by an earlier version keeps the app's records in the JSON's image info: the next start
    moves them to the SQLite records, and a second (interrupted-then-repeated) move never undoes a later change."""
    for name in ("a", "b"):
        write_stack(tmp_path / f"{name}.nii.gz")
    open_store(tmp_path)
    path = tmp_path / "datastore_v2.json"
    old = json.loads(path.read_text())
    old["objects"]["a"]["image"]["info"].update(
        {
            "qunet_quality": {"initial": [1, 2]},
            "strategy": {"qunet": {"ts": 1}},
            "qunet_served": {"x": {"slices": [3], "ts": 1}},
            "note": "kept",
        }
    )
    old["objects"]["b"]["image"]["info"].update({"qunet_error": "unreadable", "qunet_annotated": [4]})
    path.write_text(json.dumps(old))

    store = open_store(tmp_path)
    a, b = store.get_image_info("a"), store.get_image_info("b")
    assert a["qunet_quality"] == {"initial": [1, 2]} and b["qunet_error"] == "unreadable"
    assert "qunet_annotated" not in b  # annotated slices without a final label (a removal killed halfway): dropped
    on_disk = json.loads(path.read_text())["objects"]
    assert on_disk["a"]["image"]["info"]["note"] == "kept" and "strategy" not in on_disk["a"]["image"]["info"]
    assert not [k for v in on_disk.values() for k in v["image"]["info"] if k.startswith("qunet_")]
    assert records_on_disk(tmp_path)["a"]["qunet_served"] == {"x": {"slices": [3], "ts": 1}}

    store.update_image_info("a", {"qunet_quality": {"initial": [5]}})
    path.write_text(json.dumps(old))  # the JSON as an interrupted move left it
    assert open_store(tmp_path).get_image_info("a")["qunet_quality"] == {"initial": [5]}
    store.remove_image("b")
    assert "b" not in records_on_disk(tmp_path) and "b" not in open_store(tmp_path).image_infos()


def _publish_and_die(model_dir: str, die: bool) -> None:
    """Child: publish a new model as training does after an epoch, killed after writing it, before the rename."""
    app_lib()
    from qunet_app.settings import AppConf
    from qunet_app.tasks.train import QUNetTrain

    torch.manual_seed(2)
    conf = AppConf.from_conf({"features": ",".join(map(str, TINY))})
    trainer = QUNetTrain(model_dir, conf, os.path.join(model_dir, "qunet.pt"))
    if die:
        os.fsync = lambda fd: os._exit(9)
    trainer._publish(build_network(TINY))
    os._exit(0)


def test_model_publish_killed_mid_write_keeps_the_previous_model(tmp_path):
    """Training publishes its model after each epoch; a kill mid-write leaves the previous complete model, and the
    partial file is removed when the server starts again."""
    app_lib()
    from qunet_app.server.processes import clean_after_training

    torch.manual_seed(1)
    old = build_network(TINY).state_dict()
    torch.save({"model": old}, tmp_path / "qunet.pt")
    ctx = multiprocessing.get_context("fork")
    for die in (True, False):
        child = ctx.Process(target=_publish_and_die, args=(str(tmp_path), die))
        child.start()
        child.join(60)
        assert child.exitcode == (9 if die else 0)
        published = torch.load(tmp_path / "qunet.pt", weights_only=True)["model"]  # complete: it loads
        assert all(torch.equal(published[k], old[k]) for k in old) == die
        partial = [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
        assert bool(partial) == die
        clean_after_training(str(tmp_path))
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
