"""Train task `qunet`: MONAI Label's BasicTrainTask over the annotated slices only (empty ones as negatives).

Robust to what a crash or a client can leave behind: the request's settings are checked (HTTP 400 naming the
setting), nothing to train on is a 409, the published model and the train stats are replaced atomically (a
kill mid-copy leaves the previous complete file), an unusable checkpoint of an earlier run is skipped with a
warning, and an unusable `pretrained_path` is a clear error.
"""

import filecmp
import json
import logging
import os
from typing import Any

import torch
from ignite.engine import Events
from ignite.handlers import EarlyStopping
from monai.handlers import MeanDice, from_engine, stopping_fn_from_metric
from monai.inferers import SimpleInferer
from monai.transforms import Activationsd, AsDiscreted, EnsureTyped, Lambdad
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.train.basic_train import BasicTrainTask, Context
from monailabel.tasks.train.handler import PublishStatsAndModel, prepare_stats

from qunet import build_network, deep_supervision_loss
from qunet.config import TrainConfig
from qunet.io import StackError, load_label, load_stack
from qunet.network import load_weights
from qunet.slices import training_pairs
from qunet.training import augmentation

from lib import records
from lib.conf import AppConf
from lib.datastore import atomic_copy, atomic_write
from lib.errors import BadRequest, Conflict, as_bool, as_float, as_int, check_device, check_name

logger = logging.getLogger(__name__)

NOTHING_TO_TRAIN = "no annotated slices to train on: submit a label first"


def check_train_request(request: dict[str, Any]) -> dict[str, Any]:
    """The request's training settings, checked; raises BadRequest naming the first bad one."""
    checks = {
        "max_epochs": lambda v: as_int(v, "max_epochs", 1, 100000),
        "train_batch_size": lambda v: as_int(v, "train_batch_size", 1, 4096),
        "val_batch_size": lambda v: as_int(v, "val_batch_size", 1, 4096),
        "learning_rate": lambda v: as_float(v, "learning_rate", 1e-12, 10.0),
        "augment_range": lambda v: as_float(v, "augment_range", 0.0, 1.0),
        "val_split": lambda v: as_float(v, "val_split", 0.0, 0.9),
        "early_stop_patience": lambda v: as_int(v, "early_stop_patience", -1, 100000),
        "pretrained": lambda v: as_bool(v, "pretrained"),
        "multi_gpu": lambda v: as_bool(v, "multi_gpu"),
        "name": lambda v: check_name(v, "train run name"),
        "device": check_device,
    }
    checked = dict(request)
    for key, check in checks.items():
        if key in checked and not isinstance(checked[key], list):  # a list is MONAI Label's "choose one" default
            checked[key] = check(checked[key])
    for key, allowed in (("dataset", ("SmartCacheDataset", "CacheDataset", "PersistentDataset", "Dataset")),
                         ("dataloader", ("ThreadDataLoader", "DataLoader")), ("tracking", ("None", "mlflow", None))):
        value = checked.get(key)
        if value is not None and not isinstance(value, list) and value not in allowed:
            raise BadRequest(f"{key} must be one of {', '.join(map(str, allowed))}, got {value!r}")
    gpus = checked.get("gpus", "all")
    if gpus != "all" and not (isinstance(gpus, str) and all(g.strip().isdigit() for g in gpus.split(","))):
        raise BadRequest(f"gpus must be 'all' or comma-separated GPU indices, got {gpus!r}")
    for key in ("train_ds", "val_ds", "tracking_uri"):  # server-side paths: not a client's to choose
        if checked.get(key):
            raise BadRequest(f"{key} is not supported by this app")
    return checked


class AtomicPublisher(PublishStatsAndModel):
    """MONAI Label's publisher with atomic replaces: a kill mid-copy cannot leave a truncated model or stats file."""

    def iteration_completed(self):
        stats = prepare_stats(self.start_ts, self.trainer, self.evaluator)
        text = json.dumps(stats, indent=2)
        atomic_write(text, os.path.join(self.output_dir, f"stats_{self.run_id}.json"))
        if self._stats_path:
            atomic_write(text, self._stats_path)
        final_model = os.path.join(self.output_dir, self._key_metric_filename)
        if self._publish_path and os.path.exists(final_model):
            # by content: models of one network have the same size, and two saved close together can share an mtime
            if not os.path.exists(self._publish_path) or not filecmp.cmp(self._publish_path, final_model, shallow=False):
                atomic_copy(final_model, self._publish_path)
                logger.info(f"New Model published: {final_model} => {self._publish_path}")
        return stats


class QUNetTrain(BasicTrainTask):
    def __init__(self, model_dir: str, conf: AppConf, publish_path: str) -> None:
        defaults = TrainConfig()
        super().__init__(
            model_dir=model_dir,
            description="Train the U-net++ (Dice loss on all four heads) on the annotated slices",
            config={
                "max_epochs": defaults.max_epochs,
                "train_batch_size": defaults.batch_size,
                "learning_rate": defaults.learning_rate,
                "augment_range": defaults.augment_range,
                "val_split": 0.0,  # few slices: the best training Dice picks the published model
                "tracking": "None",  # current mlflow refuses MONAI Label's file store; ask for "mlflow" explicitly
            },
            amp=torch.cuda.is_available(),
            load_path=conf.pretrained_path or None,
            publish_path=publish_path,
            labels=conf.label_map(),
        )
        self.conf = conf

    def __call__(self, request, datastore: Datastore):
        return super().__call__(check_train_request(request), datastore)

    def stats(self):
        """The last run's stats; {} (logged) if the file cannot be read, so GET /info/ keeps answering."""
        try:
            return super().stats()
        except (OSError, ValueError) as e:
            logger.warning(f"train stats unreadable ({self._stats_path}): {e}")
            return {}

    def _usable(self, path: str) -> str | None:
        """None if `path` holds weights for this network, else why not."""
        try:
            load_weights(build_network(self.conf.features, len(self.conf.labels)), path, "cpu")
        except ValueError as e:
            return str(e)
        return None

    def load_path(self, output_dir, pretrained=True):
        """The previous run's best model if usable (else a warning), then pretrained_path (which must be usable)."""
        own = os.path.join(output_dir, self._key_metric_filename)
        if os.path.exists(own):
            problem = self._usable(own)
            if problem is None:
                return own
            logger.warning(f"not continuing from the previous run's model: {problem}")
        if pretrained and self._load_path:
            if not os.path.exists(self._load_path):
                raise Conflict(f"--conf pretrained_path {self._load_path}: no such file")
            problem = self._usable(self._load_path)
            if problem:
                raise Conflict(f"--conf pretrained_path cannot be used: {problem}")
            return self._load_path
        return None

    def finalize(self, context):
        """As BasicTrainTask's, with the atomic publisher."""
        if context.local_rank == 0:
            publisher = AtomicPublisher(self._stats_path, self._publish_path, self._key_metric_filename, context.start_ts,
                                        context.run_id, context.output_dir, context.trainer, context.evaluator)
            (context.evaluator or context.trainer).add_event_handler(event_name=Events.EPOCH_COMPLETED, handler=publisher)
        patience = int(context.request.get("early_stop_patience", 0))
        if patience > 0 and context.evaluator:
            metric = next(iter(self.val_key_metric(context)))
            stopper = EarlyStopping(patience=patience, score_function=stopping_fn_from_metric(metric), trainer=context.trainer)
            context.evaluator.add_event_handler(event_name=Events.EPOCH_COMPLETED, handler=stopper)

    def network(self, context: Context) -> torch.nn.Module:
        return build_network(self.conf.features, out_channels=len(self.conf.labels))

    def optimizer(self, context: Context) -> torch.optim.Optimizer:
        return torch.optim.Adam(context.network.parameters(), lr=float(context.request.get("learning_rate", 1e-4)))

    def loss_function(self, context: Context):
        return deep_supervision_loss()

    def pre_process(self, request: dict[str, Any], datastore: Datastore) -> list[dict[str, Any]]:
        items = []
        for image_id in datastore.get_labeled_images():
            try:
                stack = load_stack(datastore.get_image_uri(image_id))
                label = load_label(datastore.get_label_uri(image_id, "final"), stack)
            except StackError as e:
                logger.error(f"skipping {image_id} in training: {e}")
                continue
            slices = records.annotated(datastore, image_id, datastore.get_image_info(image_id), stack.num_slices)
            if not slices:
                continue
            x, y = training_pairs(stack.array, label, slices, self.conf.image_size, len(self.conf.labels))
            items += [{"image": xi, "label": yi, "id": f"{image_id}:{k}"} for xi, yi, k in zip(x, y, slices)]
        if not items:
            raise Conflict(NOTHING_TO_TRAIN)
        logger.info(f"training on {len(items)} annotated slices")
        return items

    def train_pre_transforms(self, context: Context) -> list:
        return augmentation(self.conf.image_size, float(context.request.get("augment_range", 0.2)))

    def val_pre_transforms(self, context: Context) -> list:
        return [EnsureTyped(keys=("image", "label"), track_meta=False)]

    def train_post_transforms(self, context: Context) -> list:
        return [
            Lambdad(keys="pred", func=lambda heads: heads[-1] if isinstance(heads, (list, tuple)) else heads),
            Activationsd(keys="pred", sigmoid=True),
            AsDiscreted(keys="pred", threshold=0.5),
        ]

    def train_key_metric(self, context: Context) -> dict:
        # one sigmoid channel per label, no background channel: keep channel 0
        return {self.TRAIN_METRIC_MEAN_DICE: MeanDice(output_transform=from_engine(["pred", "label"]), include_background=True)}

    def val_key_metric(self, context: Context) -> dict:
        return {self.VAL_METRIC_MEAN_DICE: MeanDice(output_transform=from_engine(["pred", "label"]), include_background=True)}

    def val_inferer(self, context: Context):
        return SimpleInferer()
