"""Small state files of the loop in the app's model folder, outside the datastore (which is rewritten whole on every
change), each replaced atomically and read defensively (missing or corrupt = nothing known):

- `scoring_<method>.json`: the progress of the latest scoring run of a method, written by the scoring subprocess
  (volumes done / total, slices per second, time left) and read by the server for GET /info/ and Next sample;
- `agreement.json`: per model, the agreement statistic of its scores once a disagreement run finished (the stop signal);
- `history.json`: one entry per finished training, written by the trainer (held-out Dice for the status page).
"""

import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from qunet_app.server.processes import alive

logger = logging.getLogger(__name__)

AGREEMENT = "agreement.json"
HISTORY = "history.json"
KEEP_MODELS = 200  # agreement entries kept


def read_json(path: str, default: Any) -> Any:
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError):
        return default
    return value if isinstance(value, type(default)) else default


def replace_json(path: str, value: Any) -> None:
    """Write `value` to `path` atomically (readers see the old or the new file); no fsync: losing it costs nothing.
    Not qunet_app.datastore.files.atomic_write: its `.tmp-` names in the model folder are what the cleanup after a
    killed training
    removes, which would pull a live progress file's temporary from under a scoring run."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".progress-")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(value, f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def progress_path(state_dir: str, method: str) -> str:
    return os.path.join(state_dir, f"scoring_{method}.json")


def read_progress(state_dir: str, method: str) -> dict:
    """The latest run's progress; a run marked running whose process is gone is `interrupted`."""
    progress = read_json(progress_path(state_dir, method), {})
    if progress.get("state") == "running" and not alive(progress.get("pid")):
        progress["state"] = "interrupted"
    return progress


class ScoringProgress:
    """Progress of one scoring run, logged and written to its file at most every `every` seconds (and at the start
    and the end): a thousand skipped volumes must not cost a thousand file writes."""

    def __init__(self, state_dir: str | None, method: str, model: str | None, every: float = 1.0) -> None:
        self.path = progress_path(state_dir, method) if state_dir else None
        self.every, self.written = every, 0.0
        now = time.time()
        self.state = {
            "method": method,
            "model": model,
            "pid": os.getpid(),
            "state": "running",
            "started": round(now, 3),
            "updated": round(now, 3),
            "volumes_total": 0,
            "volumes_done": 0,
            "scored": 0,
            "skipped": 0,
            "failed": 0,
            "slices_scored": 0,
            "slices_left": None,
            "seconds_scoring": 0.0,
            "slices_per_second": None,
            "eta_seconds": None,
            "current": None,
            "order": [],
        }

    def start(self, order: list[str], costs: list[int | None]) -> None:
        """`costs`: the slices each volume in `order` should take to score, None where not known yet."""
        self.costs = dict(zip(order, costs))
        self.state.update(volumes_total=len(order), order=order[:20])
        self._emit(force=True)

    def step(self, image_id: str, outcome: str, slices: int = 0, seconds: float = 0.0) -> None:
        """One volume processed: `outcome` scored, skipped or failed; `slices` scored in `seconds`."""
        s = self.state
        self.costs.pop(image_id, None)
        s["volumes_done"] += 1
        s[outcome] += 1
        s["current"] = image_id
        s["slices_scored"] += slices
        s["seconds_scoring"] = round(s["seconds_scoring"] + seconds, 3)
        if s["scored"]:  # volumes of unknown depth: as many slices as the volumes scored so far had, on average
            average = s["slices_scored"] / s["scored"]
            s["slices_left"] = round(sum(average if c is None else c for c in self.costs.values()))
        if s["slices_scored"] and s["seconds_scoring"] > 0:
            s["slices_per_second"] = round(s["slices_scored"] / s["seconds_scoring"], 2)
            s["eta_seconds"] = round(s["slices_left"] / s["slices_per_second"], 1)
        if s["volumes_done"] < s["volumes_total"]:  # the last one is written by finish(): never "running, n of n"
            self._emit(force=outcome == "scored" and s["scored"] == 1)

    def finish(self) -> None:
        self.state.update(state="done", slices_left=0, eta_seconds=0.0)
        self._emit(force=True)

    def _emit(self, force: bool) -> None:
        now = time.time()
        if not force and now - self.written < self.every:
            return
        self.written = now
        s = self.state
        s["updated"] = round(now, 3)
        rate = f", {s['slices_per_second']} slices/s" if s["slices_per_second"] else ""
        eta = (
            f", about {s['eta_seconds']:.0f} s left" if s["eta_seconds"] is not None and s["state"] == "running" else ""
        )
        logger.info(
            f"{s['method']}: {s['volumes_done']}/{s['volumes_total']} volumes ({s['scored']} scored, "
            f"{s['skipped']} unchanged, {s['failed']} failed){rate}{eta}"
        )
        if self.path:
            try:
                replace_json(self.path, s)
            except OSError as e:  # progress is a courtesy: never fail the scoring for it
                logger.warning(f"cannot write scoring progress {self.path}: {e}")


def read_agreement(state_dir: str) -> list[dict]:
    return [e for e in read_json(os.path.join(state_dir, AGREEMENT), []) if isinstance(e, dict)]


def record_agreement(state_dir: str, entry: dict) -> None:
    """Add (or replace) the entry of `entry["model"]`; called by the disagreement run when it finishes."""
    entries = [e for e in read_agreement(state_dir) if e.get("model") != entry["model"]] + [entry]
    replace_json(os.path.join(state_dir, AGREEMENT), entries[-KEEP_MODELS:])


def read_history(state_dir: str) -> list[dict]:
    """The trainer's history.json entries with the fields the status page plots; anything malformed is left out."""
    entries = []
    for e in read_json(os.path.join(state_dir, HISTORY), []):
        if isinstance(e, dict) and isinstance(e.get("slices"), int) and isinstance(e.get("ts"), (int, float)):
            heldout = e.get("heldout") if isinstance(e.get("heldout"), dict) else {}
            entries.append({**e, "heldout": heldout})
    return sorted(entries, key=lambda e: e["ts"])


def watch_model(
    signature: Callable[[], str | None], busy: Callable[[], bool], rescore: Callable[[], Any], interval: float = 1.0
) -> threading.Thread:
    """A daemon thread calling `rescore()` once a new model is in place: its signature changed and nothing is `busy`
    (a training publishes a model at every improving epoch: the one that counts is the one left when it ends)."""

    def loop() -> None:
        seen = signature()
        while True:
            time.sleep(interval)
            try:
                current = signature()
                if current and current != seen and not busy():
                    seen = current
                    logger.info("new model in place: queueing its disagreement scoring")
                    rescore()
            except Exception:  # the watcher must outlive a transient error
                logger.exception("model watch")

    thread = threading.Thread(target=loop, name="qunet-model-watch", daemon=True)
    thread.start()
    return thread
