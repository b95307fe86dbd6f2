"""Strategy `qunet` ("Next sample"): bring the policy's ranking up to date with the records, ask it (qunet.policy:
phases, stop signal, budget, the `pick` variant), record the served slices (the hold) and format the answer.

The ranking is kept between answers: only the volumes whose SQLite records changed since the last answer are read
again, and those added, removed or given a final label in the datastore's JSON, so an answer costs about the same
at 100 or 100,000 volumes. It is built afresh (every volume read) when the model whose Q counts changes.

Slices served to another client within `hold_seconds` are held back, then offered again if no label came. The
model whose Q counts is the one in place, except while a training runs (it publishes a model at every improving
epoch): then the latest scores, whichever model made them. An answer without a volume (nothing to annotate now)
has `"id": ""`, no slices and a `message`; `stop` and `scoring` say why.
"""

import logging
import os
import threading
import time
from dataclasses import dataclass, fields, replace
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from qunet.config import SelectionConfig
from qunet.io import StackError
from qunet.policy import DISAGREEMENT, LoopState, Pick, Ranking, VolumeState

from qunet_app.datastore import keys
from qunet_app.settings import AppConf
from qunet_app.tasks.pending import infos_read_only, signature_or_none
from qunet_app.tasks.progress import read_agreement, read_progress
from qunet_app.tasks.scoring import quality_record, training_running, volume_state

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    """The policy's pick, the counts behind it, and the model the records refer to."""

    loop: LoopState
    pick: Pick
    model: str | None  # signature of the model in place
    model_path: str | None
    training: bool
    volume_count: int
    annotated_slices: int
    held_slices: int  # held for other clients, not annotated
    volumes: list[VolumeState] | None = None  # every volume with its holds, when asked for (the status page)


DESCRIPTIONS = {  # what MONAI Label lists for the strategy, per `pick`
    "lesion": "Slices spread over each volume, by quality, then where the model predicts the most lesion",
    "paper": "QU-net++: S0 quality pick first, then slices where levels 3 and 4 disagree (Q < q0)",
    "middles": "As lesion, but every volume's middle slice first, one per volume",
    "interior": "As lesion, but over each volume's interior first: its end slices come last",
    "spread": "QU-net++ with the least annotated volume first and no near-neighbour slices in one answer",
}


class QUNetStrategy(Strategy):
    def __init__(self, conf: AppConf, model_path, state_dir: str) -> None:
        super().__init__(DESCRIPTIONS.get(conf.pick, f"QU-net++ slice pick `{conf.pick}`"))
        self.conf = conf
        self.model_path = model_path
        self.state_dir = state_dir  # the app's model folder: scoring progress and agreement history
        self.settings = SelectionConfig(**{f.name: getattr(conf, f.name) for f in fields(SelectionConfig)})
        self._lock = threading.Lock()  # Next sample, GET /info/ and the status page may ask at once
        self._ranking: Ranking | None = None
        self._built_for: tuple | None = None  # (model whose Q counts, datastore generation) the ranking was built for
        self._version = 0  # the records' version the ranking reflects
        self._ids: set[str] = set()  # the images it holds
        self._labelled: set[str] = set()  # those with a final label (an imported one annotates every slice)
        self._served: dict[str, dict] = {}  # image id -> served-slice records that may still hold slices

    def _held(self, served: dict, client_id: str | None, now: float) -> frozenset[int]:
        """Slices served within the hold and not submitted, to another client than `client_id` (None: to anyone)."""
        held: set[int] = set()
        for client, entry in served.items():
            if client != client_id and not entry.get("submitted") and now - entry.get("ts", 0) < self.conf.hold_seconds:
                held.update(entry["slices"])
        return frozenset(held)

    def _agreement(self, model: str | None) -> list[float | None]:
        """Agreement statistics, oldest first, ending with `model`'s (None: the latest model scored); [] until then."""
        entries = read_agreement(self.state_dir)
        if model is not None and (not entries or entries[-1].get("model") != model):
            return []
        return [e.get("agreement") for e in entries]

    def _holding(self, served: dict, now: float) -> bool:
        return bool(self._held(served, None, now))

    def _note_served(self, image_id: str, info: dict) -> None:
        """Keep a volume's served-slice records while one may hold slices (only these are looked at per answer)."""
        served = info.get(keys.SERVED) or {}
        if self._holding(served, time.time()):
            self._served[image_id] = served
        else:
            self._served.pop(image_id, None)

    def _ranking_now(self, datastore: Datastore, model: str | None) -> Ranking:
        """The ranking for `model`'s Q, up to date (caller holds self._lock)."""
        generation = datastore.generation() if callable(getattr(datastore, "generation", None)) else None
        store = getattr(datastore, "records", None)
        labelled = getattr(datastore, "final_labelled", None)
        if (
            self._ranking is None
            or store is None
            or generation is None
            or model != self._built_for[0]
            or not callable(labelled)
        ):
            self._version = store.version() if store is not None else 0  # before reading: later changes are read again
            infos = list(infos_read_only(datastore))
            self._ranking = Ranking(
                self.settings, (volume_state(datastore, i, info, model, self.conf.q0) for i, info in infos)
            )
            self._ids, self._served, self._built_for = {i for i, _ in infos}, {}, (model, generation)
            self._labelled = labelled() if callable(labelled) else set()
            for image_id, info in infos:
                self._note_served(image_id, info)
            return self._ranking
        self._version, changed = store.changed_since(self._version)
        if generation != self._built_for[1]:  # the JSON changed: images added or removed, labels saved or imported
            ids, now_labelled = set(datastore.list_images()), labelled()
            for image_id in self._ids - ids:
                self._ranking.discard(image_id)
                self._served.pop(image_id, None)
            changed |= (ids - self._ids) | (now_labelled ^ self._labelled)
            self._ids, self._labelled, self._built_for = ids, now_labelled, (model, generation)
        for image_id in changed & self._ids:
            info = datastore.get_image_info(image_id)
            self._ranking.put(volume_state(datastore, image_id, info, model, self.conf.q0))
            self._note_served(image_id, info)
        return self._ranking

    def snapshot(
        self, datastore: Datastore, client_id: str | None = None, now: float | None = None, with_volumes: bool = False
    ) -> Snapshot:
        now = time.time() if now is None else now
        path = self.model_path()
        signature = signature_or_none(path) if path else None
        training = training_running()
        model = None if training else signature  # whose Q counts (None: the latest, whichever model made it)
        loop = LoopState(has_model=signature is not None, agreement=self._agreement(model))
        with self._lock:
            ranking = self._ranking_now(datastore, model)
            self._served = {i: served for i, served in self._served.items() if self._holding(served, now)}
            held = {i: h for i, served in self._served.items() if (h := self._held(served, client_id, now))}
            pick = ranking.choose(loop, held)
            volumes = (
                [replace(v, held=held.get(v.image_id, frozenset())) for v in ranking.volumes()]
                if with_volumes
                else None
            )
            return Snapshot(
                loop,
                pick,
                signature,
                path,
                training,
                len(ranking),
                ranking.annotated_slices,
                sum(len(h - ranking.get(i).annotated) for i, h in held.items()),
                volumes,
            )

    def _snapshot_with_quality(self, datastore: Datastore, client_id: str, now: float) -> Snapshot:
        """The snapshot; when the S0 pick finds nothing but some volume has no quality record yet (background
        scoring has not reached it, e.g. right after start), that volume is scored now and the policy asked again."""
        tried: set[str] = set()
        while True:
            snap = self.snapshot(datastore, client_id, now)
            pick = snap.pick
            if pick.slices or pick.stop or pick.phase == DISAGREEMENT:
                return snap
            with self._lock:
                missing = self._ranking.first_without_quality(tried)
            if missing is None:
                return snap
            tried.add(missing)
            self._score_now(datastore, missing)

    def __call__(self, request: dict, datastore: Datastore) -> dict[str, Any]:
        client_id = keys.client_id(request.get("client_id"))
        now = time.time()
        snap = self._snapshot_with_quality(datastore, client_id, now)
        pick = snap.pick
        answer: dict[str, Any] = {"id": pick.image_id or "", "slices": pick.slices, "phase": pick.phase}
        if pick.image_id:
            info = datastore.get_image_info(pick.image_id)
            served = {**(info.get(keys.SERVED) or {}), client_id: {"slices": pick.slices, "ts": round(now, 3)}}
            # MONAI Label's endpoint then records {"strategy": {name: ts, client}}; writing the same here makes its
            # update a no-op, so Next sample rewrites the datastore file once, not twice
            used = {
                **(info.get("strategy") or {}),
                request.get("strategy") or "qunet": {"ts": int(time.time()), "client_id": request.get("client_id")},
            }
            datastore.update_image_info(pick.image_id, {keys.SERVED: served, "strategy": used})
            # per slice: Q and the predicted lesion pixels of the model, or the quality metrics before one
            # (a record removed since the snapshot, by a label deletion or a new file: no scores in the answer)
            if pick.phase == DISAGREEMENT:
                rec, scores = info.get(keys.DISAGREEMENT) or {}, ("q", "area")
            else:
                rec, scores = info.get(keys.QUALITY) or {}, ("blurriness", "psnr_inv")
            answer["scores"] = {k: [rec[k][i] for i in pick.slices] for k in scores if rec.get(k)}
            # stock 3D Slicer names the loaded volume node after PatientID: the annotator sees the slices there
            answer["PatientID"] = f"{pick.image_id} - annotate slices (K) {', '.join(map(str, pick.slices))}"
        else:
            answer["message"] = pick.message
        if snap.loop.has_model:
            answer["q0"] = pick.q0
        if pick.stop:
            answer["stop"] = {"reason": pick.stop.reason, "message": pick.stop.message}
        if pick.pending:
            answer["scoring"] = self.scoring_status(snap)
        if pick.remaining is not None:
            answer["budget"] = {"budget": self.settings.budget, "remaining": pick.remaining}
        return answer

    def scoring_status(self, snap: Snapshot) -> dict[str, Any]:
        """The current model's disagreement scoring: its run's progress, or `queued` when no run of it has begun."""
        progress = read_progress(self.state_dir, keys.DISAGREEMENT)
        if progress.get("model") != snap.model or snap.training:
            progress = {"state": "waiting for the training to end" if snap.training else "queued"}
        keep = ("state", "volumes_done", "volumes_total", "slices_per_second", "eta_seconds", "updated")
        return {"pending_volumes": snap.pick.pending, **{k: progress[k] for k in keep if k in progress}}

    def model_time(self, snap: Snapshot) -> int | None:
        try:
            return int(os.stat(snap.model_path).st_mtime) if snap.model_path else None
        except OSError:
            return None

    def _score_now(self, datastore: Datastore, image_id: str) -> None:
        """Quality for an image the background scoring has not reached yet (e.g. Next sample right after start)."""
        path = datastore.get_image_uri(image_id)
        try:
            rec = quality_record(path, self.conf)
        except StackError as e:  # a bad file: skipped until it changes (as the scoring run does)
            datastore.update_image_info(image_id, {keys.ERROR: str(e), keys.ERROR_SOURCE: signature_or_none(path)})
        except Exception:  # anything else must not fail Next sample for every client: skip it this time
            logger.exception(f"cannot score {image_id} for Next sample")
        else:
            datastore.update_image_info(image_id, {keys.QUALITY: rec})


class _EmptySampleWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "Failed to update Image info for "


def quiet_empty_sample_warning() -> None:
    """MONAI Label's Next sample endpoint records the strategy in the answer's image info, and warns when it cannot:
    for an answer without a volume (`"id": ""`) there is nothing to record; that one warning is dropped."""
    endpoint_logger = logging.getLogger("monailabel.endpoints.activelearning")
    if not any(isinstance(f, _EmptySampleWarning) for f in endpoint_logger.filters):
        endpoint_logger.addFilter(_EmptySampleWarning())
