"""Scoring methods: model-free quality (`qunet_quality`) and level-3/level-4 disagreement (`qunet_disagreement`).

Both store their per-slice results in image info with the signatures of what they were computed from, and
skip an image whose signatures have not changed, so repeated scoring only does new work. Each image's result
is stored as soon as it is computed, so a run that is killed keeps what it finished.

An image that cannot be scored (unreadable, not a 3D stack, NaN voxels, ...) is reported, not fatal: the error
goes to the log and to its image info (`qunet_error`, with the file signature it was found for), it is counted
as failed, and the other images are scored. It is not read again until its file changes.

Each run logs its progress (volumes done / total, slices per second, time left) and writes it to
`<model folder>/scoring_<method>.json` for the server (qunet_app/tasks/progress.py).
"""

import logging
import time
from collections.abc import Callable, Set
from dataclasses import fields
from typing import Any

import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import ImageNotFoundException
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.utils.async_tasks.utils import processes

from qunet import build_network, select_by_disagreement, select_initial, slice_quality
from qunet.config import QualityConfig
from qunet.disagreement import disagreement_and_area
from qunet.io import StackError, file_signature, load_stack
from qunet.network import default_device, load_weights, prepare
from qunet.policy import VolumeState, rescore_order
from qunet.stopping import agreement

from qunet_app.datastore import keys
from qunet_app.server.errors import Conflict
from qunet_app.settings import AppConf
from qunet_app.tasks.pending import PendingImages, infos_read_only, signature_or_none
from qunet_app.tasks.progress import ScoringProgress, record_agreement
from qunet_app.tasks.ranks import run_ranks

logger = logging.getLogger(__name__)


def quality_record(path: str, conf: AppConf) -> dict[str, Any]:
    stack = load_stack(path)
    quality = slice_quality(stack.array, median_window=conf.median_window)
    initial = select_initial(quality, conf)
    metrics = {k: keys.rounded(getattr(quality, k)) for k in ("blurriness", "psnr_inv", "cov", "mean")}
    return {
        "source": file_signature(path),
        "params": _quality_params(conf),
        "slices": stack.num_slices,
        "valid": quality.valid.tolist(),
        "roi": quality.roi,
        "initial": initial,
        **metrics,
    }


def _quality_params(conf: AppConf) -> list:
    return [getattr(conf, f.name) for f in fields(QualityConfig)]  # the settings the record depends on


def training_running() -> bool:
    """Whether this process (the server) runs a training subprocess."""
    return bool(processes("train"))


def _each_image(
    datastore: Datastore,
    done: Callable[[dict, str], bool],
    score: Callable[[str, str, dict], dict],
    key: str,
    progress: ScoringProgress,
    order: list[str],
    cost: Callable[[dict], int | None],
) -> dict:
    """Score the images in `order`, skipping those `done`; `cost(info)`: the slices an image's scoring takes (for the
    progress' time left)."""
    counts = {"scored": 0, "skipped": 0, "failed": 0}
    infos = dict(infos_read_only(datastore))
    progress.start(order, [cost(infos.get(i) or {}) for i in order])
    for image_id in order:
        outcome, start, slices = "failed", time.perf_counter(), 0
        try:
            info = datastore.get_image_info(image_id)
            path = datastore.get_image_uri(image_id)
            source = signature_or_none(path)
            if info.get(keys.ERROR) and source is not None and info.get(keys.ERROR_SOURCE) == source:
                continue  # known bad, file unchanged: not read again
            if source is not None and done(info, path):
                outcome = "skipped"
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
                datastore.update_image_info(image_id, {key: result, keys.ERROR: None, keys.ERROR_SOURCE: None})
                outcome, slices = "scored", cost({**info, key: result}) or 0
                continue
            logger.error(f"cannot score {image_id}: {error}")
            datastore.update_image_info(image_id, {keys.ERROR: error, keys.ERROR_SOURCE: error_source})
        except (ImageNotFoundException, FileNotFoundError):  # removed while scoring
            logger.info(f"{image_id} was removed while scoring")
            outcome = "skipped"
        finally:
            counts[outcome] += 1
            progress.step(image_id, outcome, slices, time.perf_counter() - start if slices else 0.0)
    progress.finish()
    if counts["failed"]:
        logger.warning(f"{counts['failed']} image(s) cannot be scored: see qunet_error in their image info")
    return counts


def _depth(info: dict) -> int | None:
    """Slices of the image as its records know them; None before any record."""
    rec = info.get(keys.QUALITY) or info.get(keys.DISAGREEMENT) or {}
    return int(rec.get("slices") or len(rec.get("q") or ())) or None


def _open_slices(info: dict) -> int | None:
    depth = _depth(info)
    return None if depth is None else max(0, depth - len(info.get(keys.ANNOTATED) or ()))


def volume_state(
    datastore: Datastore, image_id: str, info: dict, model: str | None, q0: float, held: Set[int] = frozenset()
) -> VolumeState:
    """The policy's view of one volume's records; Q counts only if made by `model` (None: by whichever model). The
    record's `flagged` (slices below its q0, lowest Q first) spares the policy a sort when made for `q0`."""
    quality, rec = info.get(keys.QUALITY), info.get(keys.DISAGREEMENT)
    depth = _depth(info)
    annotated = keys.annotated(datastore, image_id, info, depth) if depth else info.get(keys.ANNOTATED) or []
    current = rec and (model is None or rec.get("model") == model)
    ranked = rec.get("flagged") if current and rec.get("q0") == q0 else None
    constant = frozenset(k for k, ok in enumerate(quality.get("valid") or ()) if not ok) if quality else frozenset()
    return VolumeState(
        image_id,
        quality["initial"] if quality else None,
        rec["q"] if current else None,
        frozenset(annotated),
        held,
        bool(info.get(keys.ERROR)),
        ranked,
        rec.get("area") if current else None,
        depth,
        constant,
    )


class QualityScoring(ScoringMethod):
    def __init__(self, conf: AppConf, state_dir: str | None = None, shard: tuple[int, int] = (0, 1)) -> None:
        super().__init__("Per-slice blurriness, PSNR-inv, ROI CoV and mean, and the model-free S0 pick")
        self.conf = conf
        self.state_dir = state_dir  # where the run's progress goes (the app's model folder)
        self.shard = (
            shard  # (rank, ranks): this process scores every ranks-th image of the run's order (score_cohort.py)
        )
        self._pending = PendingImages(keys.QUALITY)

    def _done(self, info: dict, path: str) -> bool:
        rec = info.get(keys.QUALITY) or {}
        return rec.get("source") == file_signature(path) and rec.get("params") == _quality_params(self.conf)

    def pending(self, datastore: Datastore) -> bool:
        return self._pending.any(datastore, self._done)

    def __call__(self, request: dict, datastore: Datastore) -> dict:
        progress = ScoringProgress(self.state_dir, keys.QUALITY, None)
        rank, ranks = self.shard
        return _each_image(
            datastore,
            self._done,
            lambda _id, path, _info: quality_record(path, self.conf),
            keys.QUALITY,
            progress,
            sorted(datastore.list_images())[rank::ranks],
            _depth,
        )


class DisagreementScoring(ScoringMethod):
    """Re-scores only what changed (the model or the image; annotated slices are never scored), volumes most likely
    to be asked for next first (qunet.policy.rescore_order), so Next sample can use them while the rest is scored.
    On a machine with two or more GPUs a whole run goes to score_cohort.py with one rank per GPU (`ranks_command`)."""

    def __init__(
        self,
        conf: AppConf,
        model_path: Callable[[], str | None],
        state_dir: str | None = None,
        shard: tuple[int, int] = (0, 1),
        ranks_command: list[str] | None = None,
    ) -> None:
        super().__init__("Per-slice Q = Jaccard(level 3 > 0.5, level 4 > 0.5) of the current U-net++")
        self.conf = conf
        self.model_path = model_path
        self.state_dir = state_dir  # where the run's progress and the agreement history go (the app's model folder)
        self.shard = (
            shard  # (rank, ranks): this process scores every ranks-th image of the run's order (score_cohort.py)
        )
        self.ranks_command = ranks_command  # score_cohort.py with the server's studies and conf
        self._pending = PendingImages(keys.DISAGREEMENT)

    @staticmethod
    def _done_for(model: str) -> Callable[[dict, str], bool]:
        def done(info: dict, image_path: str) -> bool:
            rec = info.get(keys.DISAGREEMENT) or {}
            # a record from before the lesion area was stored is scored again
            return rec.get("model") == model and "area" in rec and rec.get("source") == file_signature(image_path)

        return done

    def pending(self, datastore: Datastore) -> bool:
        """Whether a run has work; never while a training runs: it publishes a model at every improving epoch, and the
        server queues the re-score of the one in place when it ends (progress.watch_model)."""
        path = self.model_path()
        if not path or training_running():
            return False
        model = file_signature(path)
        return self._pending.any(datastore, self._done_for(model), model)

    def __call__(self, request: dict, datastore: Datastore) -> dict:
        path = self.model_path()
        if not path:
            return {"skipped": "no trained model yet"}
        model = file_signature(path)
        gpus = torch.cuda.device_count()
        if gpus > 1 and self.ranks_command and self.shard == (0, 1):
            logger.info(f"disagreement scoring over {gpus} GPUs")
            return run_ranks([*self.ranks_command, "--methods", "disagreement", "--model", path, "--progress"], gpus)[
                "disagreement"
            ]
        device = default_device()
        try:
            network = prepare(
                load_weights(build_network(self.conf.features, len(self.conf.labels)), path, device), device
            )
        except ValueError as e:  # corrupt, or trained with other features or labels
            raise Conflict(f"the model cannot be used for disagreement scoring: {e}") from e

        def score(image_id: str, image_path: str, info: dict) -> dict:
            stack = load_stack(image_path)
            skip = set(keys.annotated(datastore, image_id, info, stack.num_slices))
            todo = [k for k in range(stack.num_slices) if k not in skip]
            q, area = disagreement_and_area(network, stack.array, self.conf.patch_size, todo, device)
            return {
                "model": model,
                "source": file_signature(image_path),
                "q0": self.conf.q0,
                "q": keys.rounded(q),
                "flagged": select_by_disagreement(q, self.conf.q0, skip),
                "area": keys.rounded(area),
            }

        order = rescore_order(
            [volume_state(datastore, i, info, None, self.conf.q0) for i, info in infos_read_only(datastore)]
        )
        rank, ranks = self.shard
        progress = ScoringProgress(self.state_dir, keys.DISAGREEMENT, model)
        counts = _each_image(
            datastore, self._done_for(model), score, keys.DISAGREEMENT, progress, order[rank::ranks], _open_slices
        )
        if self.state_dir and ranks == 1:  # a shard's share is not the model's agreement: score_cohort.py records it
            self.record_agreement(datastore, model)
        return counts

    def record_agreement(self, datastore: Datastore, model: str) -> None:
        """The model's agreement statistic over the open slices it scored (the stop signal compares the last two)."""
        open_q: list[float] = []
        for image_id, info in infos_read_only(datastore):
            v = volume_state(datastore, image_id, info, model, self.conf.q0)
            open_q += [q for k, q in enumerate(v.q or ()) if q is not None and k not in v.annotated]
        entry = {
            "model": model,
            "ts": int(time.time()),
            "agreement": agreement(open_q),
            "open_slices": len(open_q),
            "below_q0": sum(q < self.conf.q0 for q in open_q),
        }
        try:
            record_agreement(self.state_dir, entry)
        except OSError as e:
            logger.warning(f"cannot record the model's agreement in {self.state_dir}: {e}")
