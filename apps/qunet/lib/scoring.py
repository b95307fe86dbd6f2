"""Scoring methods: model-free quality (`qunet_quality`) and level-3/level-4 disagreement (`qunet_disagreement`).

Both store their per-slice results in image info with the signatures of what they were computed from, and
skip an image whose signatures have not changed, so repeated scoring only does new work.
"""

import logging
from collections.abc import Callable
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod

from qunet import build_network, disagreement_scores, select_by_disagreement, select_initial, slice_quality
from qunet.disagreement import prepare
from qunet.io import StackError, file_signature, load_stack
from qunet.network import default_device, load_weights

from lib import records
from lib.conf import AppConf

logger = logging.getLogger(__name__)


def quality_record(path: str, conf: AppConf) -> dict[str, Any]:
    stack = load_stack(path)
    quality = slice_quality(stack.array, median_window=conf.median_window)
    initial = select_initial(quality, conf.epsilon0, conf.max_initial, conf.blur_percentile, conf.psnr_percentile)
    metrics = {k: records.rounded(getattr(quality, k)) for k in ("blurriness", "psnr_inv", "cov", "mean")}
    return {"source": file_signature(path), "params": _quality_params(conf), "slices": stack.num_slices,
            "valid": quality.valid.tolist(), "roi": quality.roi, "initial": initial, **metrics}


def _quality_params(conf: AppConf) -> list:
    return [conf.median_window, conf.epsilon0, conf.max_initial, conf.blur_percentile, conf.psnr_percentile]


def _each_image(datastore: Datastore, done: Callable[[dict, str], bool], score: Callable[[str, str, dict], dict], key: str) -> dict:
    counts = {"scored": 0, "skipped": 0, "failed": 0}
    for image_id in datastore.list_images():
        info = datastore.get_image_info(image_id)
        path = datastore.get_image_uri(image_id)
        if done(info, path):
            counts["skipped"] += 1
            continue
        try:
            result = score(image_id, path, info)
        except StackError as e:
            logger.error(f"cannot score {image_id}: {e}")
            datastore.update_image_info(image_id, {records.ERROR: str(e)})
            counts["failed"] += 1
            continue
        datastore.update_image_info(image_id, {key: result, records.ERROR: None})
        counts["scored"] += 1
    return counts


class QualityScoring(ScoringMethod):
    def __init__(self, conf: AppConf) -> None:
        super().__init__("Per-slice blurriness, PSNR-inv, ROI CoV and mean, and the model-free S0 pick")
        self.conf = conf

    def __call__(self, request: dict, datastore: Datastore) -> dict:
        def done(info: dict, path: str) -> bool:
            rec = info.get(records.QUALITY) or {}
            return rec.get("source") == file_signature(path) and rec.get("params") == _quality_params(self.conf)

        return _each_image(datastore, done, lambda _id, path, _info: quality_record(path, self.conf), records.QUALITY)


class DisagreementScoring(ScoringMethod):
    def __init__(self, conf: AppConf, model_path: Callable[[], str | None]) -> None:
        super().__init__("Per-slice Q = Jaccard(level 3 > 0.5, level 4 > 0.5) of the current U-net++")
        self.conf = conf
        self.model_path = model_path

    def __call__(self, request: dict, datastore: Datastore) -> dict:
        path = self.model_path()
        if not path:
            return {"skipped": "no trained model yet"}
        model = file_signature(path)
        device = default_device()
        network = prepare(load_weights(build_network(self.conf.features, len(self.conf.labels)), path, device), device)

        def done(info: dict, image_path: str) -> bool:
            rec = info.get(records.DISAGREEMENT) or {}
            return rec.get("model") == model and rec.get("source") == file_signature(image_path)

        def score(image_id: str, image_path: str, info: dict) -> dict:
            stack = load_stack(image_path)
            skip = set(records.annotated(datastore, image_id, info, stack.num_slices))
            todo = [k for k in range(stack.num_slices) if k not in skip]
            q = disagreement_scores(network, stack.array, self.conf.image_size, self.conf.score_batch_size, todo, device)
            return {"model": model, "source": file_signature(image_path), "q0": self.conf.q0,
                    "q": records.rounded(q), "flagged": select_by_disagreement(q, self.conf.q0, skip)}

        return _each_image(datastore, done, score, records.DISAGREEMENT)
