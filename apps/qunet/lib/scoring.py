"""Scoring methods: model-free quality (`qunet_quality`) and level-3/level-4 disagreement (`qunet_disagreement`).

Both store their per-slice results in image info with the signatures of what they were computed from, and
skip an image whose signatures have not changed, so repeated scoring only does new work. Each image's result
is stored as soon as it is computed, so a run that is killed keeps what it finished.

An image that cannot be scored (unreadable, not a 3D stack, NaN voxels, ...) is reported, not fatal: the error
goes to the log and to its image info (`qunet_error`, with the file signature it was found for), it is counted
as failed, and the other images are scored. It is not read again until its file changes.
"""

import logging
from collections.abc import Callable, Iterator
from dataclasses import fields
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import ImageNotFoundException
from monailabel.interfaces.tasks.scoring import ScoringMethod

from qunet import build_network, disagreement_scores, select_by_disagreement, select_initial, slice_quality
from qunet.config import QualityConfig
from qunet.io import StackError, file_signature, load_stack
from qunet.network import default_device, load_weights, prepare

from lib import records
from lib.conf import AppConf
from lib.errors import Conflict

ERROR_SOURCE = "qunet_error_source"  # file signature the error in records.ERROR was found for

logger = logging.getLogger(__name__)


def quality_record(path: str, conf: AppConf) -> dict[str, Any]:
    stack = load_stack(path)
    quality = slice_quality(stack.array, median_window=conf.median_window)
    initial = select_initial(quality, conf)
    metrics = {k: records.rounded(getattr(quality, k)) for k in ("blurriness", "psnr_inv", "cov", "mean")}
    return {"source": file_signature(path), "params": _quality_params(conf), "slices": stack.num_slices,
            "valid": quality.valid.tolist(), "roi": quality.roi, "initial": initial, **metrics}


def _quality_params(conf: AppConf) -> list:
    return [getattr(conf, f.name) for f in fields(QualityConfig)]  # the settings the record depends on


def signature_or_none(path: str) -> str | None:
    try:
        return file_signature(path)
    except OSError:
        return None


def _each_image(datastore: Datastore, done: Callable[[dict, str], bool], score: Callable[[str, str, dict], dict], key: str) -> dict:
    counts = {"scored": 0, "skipped": 0, "failed": 0}
    for image_id in datastore.list_images():
        try:
            info = datastore.get_image_info(image_id)
            path = datastore.get_image_uri(image_id)
            source = signature_or_none(path)
            if info.get(records.ERROR) and source is not None and info.get(ERROR_SOURCE) == source:
                counts["failed"] += 1  # known bad, file unchanged: not read again
                continue
            if source is not None and done(info, path):
                counts["skipped"] += 1
                continue
            try:
                result = score(image_id, path, info)
            except StackError as e:  # the file: not read again until it changes
                error, error_source = str(e), source
            except (ImageNotFoundException, FileNotFoundError):
                raise
            except Exception as e:  # one image must not stop the others; tried again next run
                logger.exception(f"cannot score {image_id}")
                error, error_source = f"{path}: {type(e).__name__}: {e}", None
            else:
                datastore.update_image_info(image_id, {key: result, records.ERROR: None, ERROR_SOURCE: None})
                counts["scored"] += 1
                continue
            logger.error(f"cannot score {image_id}: {error}")
            datastore.update_image_info(image_id, {records.ERROR: error, ERROR_SOURCE: error_source})
            counts["failed"] += 1
        except (ImageNotFoundException, FileNotFoundError):  # removed while scoring
            logger.info(f"{image_id} was removed while scoring")
            counts["skipped"] += 1
    if counts["failed"]:
        logger.warning(f"{counts['failed']} image(s) cannot be scored: see qunet_error in their image info")
    return counts


def infos_read_only(datastore: Datastore) -> Iterator[tuple[str, dict]]:
    """(id, info) of every image, read-only, without LocalDatastore's deep copy of each info: with a thousand scored
    volumes the copies cost more than the rest of Next sample. In id order; an image the datastore lists but has no
    record of yet (a DICOMweb series not fetched) has info {}."""
    image_ids = sorted(datastore.list_images())
    if not isinstance(getattr(getattr(datastore, "_datastore", None), "objects", None), dict):
        yield from ((i, datastore.get_image_info(i)) for i in image_ids)
        return
    if callable(getattr(datastore, "_fresh", None)):
        datastore._fresh()
    for image_id in image_ids:
        obj = datastore._datastore.objects.get(image_id)  # looked up each time: a reload may replace the model
        yield image_id, (obj.image.info if obj is not None else {})


def _pending(datastore: Datastore, done: Callable[[dict, str], bool], key: str) -> bool:
    """Whether a run would score anything: an image without an up-to-date record that is not known to be bad.
    Cheap: no image is read (or, from DICOMweb, fetched)."""
    for image_id, info in infos_read_only(datastore):
        if not info.get(key) and not info.get(records.ERROR):
            return True
        path = datastore.get_image_uri(image_id)
        source = signature_or_none(path)
        if source is None or info.get(records.ERROR) and info.get(ERROR_SOURCE) == source:
            continue
        if not done(info, path):
            return True
    return False


class QualityScoring(ScoringMethod):
    def __init__(self, conf: AppConf) -> None:
        super().__init__("Per-slice blurriness, PSNR-inv, ROI CoV and mean, and the model-free S0 pick")
        self.conf = conf

    def _done(self, info: dict, path: str) -> bool:
        rec = info.get(records.QUALITY) or {}
        return rec.get("source") == file_signature(path) and rec.get("params") == _quality_params(self.conf)

    def pending(self, datastore: Datastore) -> bool:
        return _pending(datastore, self._done, records.QUALITY)

    def __call__(self, request: dict, datastore: Datastore) -> dict:
        return _each_image(datastore, self._done, lambda _id, path, _info: quality_record(path, self.conf), records.QUALITY)


class DisagreementScoring(ScoringMethod):
    def __init__(self, conf: AppConf, model_path: Callable[[], str | None]) -> None:
        super().__init__("Per-slice Q = Jaccard(level 3 > 0.5, level 4 > 0.5) of the current U-net++")
        self.conf = conf
        self.model_path = model_path

    @staticmethod
    def _done_for(model: str) -> Callable[[dict, str], bool]:
        def done(info: dict, image_path: str) -> bool:
            rec = info.get(records.DISAGREEMENT) or {}
            return rec.get("model") == model and rec.get("source") == file_signature(image_path)

        return done

    def pending(self, datastore: Datastore) -> bool:
        path = self.model_path()
        return bool(path) and _pending(datastore, self._done_for(file_signature(path)), records.DISAGREEMENT)

    def __call__(self, request: dict, datastore: Datastore) -> dict:
        path = self.model_path()
        if not path:
            return {"skipped": "no trained model yet"}
        model = file_signature(path)
        device = default_device()
        try:
            network = prepare(load_weights(build_network(self.conf.features, len(self.conf.labels)), path, device), device)
        except ValueError as e:  # corrupt, or trained with other features or labels
            raise Conflict(f"the model cannot be used for disagreement scoring: {e}") from e

        def score(image_id: str, image_path: str, info: dict) -> dict:
            stack = load_stack(image_path)
            skip = set(records.annotated(datastore, image_id, info, stack.num_slices))
            todo = [k for k in range(stack.num_slices) if k not in skip]
            q = disagreement_scores(network, stack.array, self.conf.patch_size, todo, device)
            return {"model": model, "source": file_signature(image_path), "q0": self.conf.q0,
                    "q": records.rounded(q), "flagged": select_by_disagreement(q, self.conf.q0, skip)}

        return _each_image(datastore, self._done_for(model), score, records.DISAGREEMENT)
