"""Strategy `qunet` ("Next sample"): which volume to open and which of its slices to annotate.

Before a model exists: the next volume with S0 slices left (best quality first). Once one exists: the volume
whose unannotated slices disagree most (lowest Q below q0), with those slices, lowest Q first. Slices served
to another client within `hold_seconds` are held back, then offered again if no label came.
"""

import logging
import time
from collections.abc import Callable
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from qunet.io import StackError

from lib import records
from lib.conf import AppConf
from lib.scoring import ERROR_SOURCE, infos_read_only, quality_record, signature_or_none

logger = logging.getLogger(__name__)


class QUNetStrategy(Strategy):
    def __init__(self, conf: AppConf, model_path: Callable[[], str | None]) -> None:
        super().__init__("QU-net++: S0 quality pick first, then slices where levels 3 and 4 disagree (Q < q0)")
        self.conf = conf
        self.model_path = model_path

    def _held(self, info: dict, client_id: str, now: float) -> set[int]:
        held: set[int] = set()
        for client, served in (info.get(records.SERVED) or {}).items():
            if client != client_id and not served.get("submitted") and now - served["ts"] < self.conf.hold_seconds:
                held.update(served["slices"])
        return held

    def _candidates(self, datastore: Datastore, image_id: str, info: dict, phase: str, held: set[int]) -> list[tuple[int, float]]:
        """(slice, score) pairs still to annotate in this image, best first; score = Q or quality rank."""
        rec = info.get(records.QUALITY if phase == "initial" else records.DISAGREEMENT)
        if not rec:
            return []
        depth = len(rec["q"]) if phase == "disagreement" else rec["slices"]
        skip = held | set(records.annotated(datastore, image_id, info, depth))
        if phase == "initial":
            return [(k, rank) for rank, k in enumerate(rec["initial"]) if k not in skip]
        return [(k, rec["q"][k]) for k in rec["flagged"] if k not in skip and rec["q"][k] is not None]

    def _pick(self, datastore: Datastore, phase: str, client_id: str, now: float) -> tuple[tuple | None, bool]:
        """The best (key, image id, candidates) for a phase, and whether any image had scores for it."""
        best: tuple[Any, ...] | None = None
        scored = False
        for image_id, info in infos_read_only(datastore):
            if phase == "initial" and not info.get(records.QUALITY) and not info.get(records.ERROR):
                info = self._score_now(datastore, image_id)
            scored |= bool(info.get(records.QUALITY if phase == "initial" else records.DISAGREEMENT))
            found = self._candidates(datastore, image_id, info, phase, self._held(info, client_id, now))
            if not found:
                continue
            if phase == "initial":  # volumes in id order
                return (0.0, image_id, found), True
            if best is None or found[0][1] < best[0]:  # the volume holding the lowest Q
                best = (found[0][1], image_id, found)
        return best, scored

    def __call__(self, request: dict, datastore: Datastore) -> dict[str, Any] | None:
        client_id = records.client_id(request.get("client_id"))
        now = time.time()
        best, scored = self._pick(datastore, "disagreement", client_id, now) if self.model_path() else (None, False)
        phase = "disagreement"
        if best is None and not scored:  # no model yet, or its scoring has not run: the model-free pick
            best, _ = self._pick(datastore, "initial", client_id, now)
            phase = "initial"
        if best is None:
            return None
        _, image_id, found = best
        found = found[: self.conf.slices_per_sample]
        slices = [k for k, _ in found]
        info = datastore.get_image_info(image_id)
        served = {**(info.get(records.SERVED) or {}), client_id: {"slices": slices, "ts": int(now)}}
        # MONAI Label's endpoint then records {"strategy": {name: ts, client}}; writing the same here makes its
        # update a no-op, so Next sample rewrites the datastore file once, not twice
        used = {**(info.get("strategy") or {}), request.get("strategy") or "qunet": {
            "ts": int(time.time()), "client_id": request.get("client_id")}}
        datastore.update_image_info(image_id, {records.SERVED: served, "strategy": used})
        if phase == "initial":
            rec = info[records.QUALITY]
            scores = {k: [rec[k][i] for i in slices] for k in ("blurriness", "psnr_inv")}
        else:
            scores = {"q": [s for _, s in found]}
        return {
            "id": image_id,
            "slices": slices,
            "phase": phase,
            "scores": scores,
            # stock 3D Slicer names the loaded volume node after PatientID: the annotator sees the slices there
            "PatientID": f"{image_id} - annotate slices (K) {', '.join(map(str, slices))}",
        }

    def _score_now(self, datastore: Datastore, image_id: str) -> dict:
        """Quality for an image the background scoring has not reached yet (e.g. Next sample right after start)."""
        path = datastore.get_image_uri(image_id)
        try:
            rec = quality_record(path, self.conf)
        except StackError as e:  # a bad file: skipped until it changes (as the scoring run does)
            datastore.update_image_info(image_id, {records.ERROR: str(e), ERROR_SOURCE: signature_or_none(path)})
        except Exception:  # anything else must not fail Next sample for every client: skip it this time
            logger.exception(f"cannot score {image_id} for Next sample")
            return {}
        else:
            datastore.update_image_info(image_id, {records.QUALITY: rec})
        return datastore.get_image_info(image_id)
