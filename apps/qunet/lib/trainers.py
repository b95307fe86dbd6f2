"""Train task `qunet`: MONAI Label's BasicTrainTask over the annotated slices only (empty ones as negatives)."""

import logging
from typing import Any

import torch
from monai.handlers import MeanDice, from_engine
from monai.inferers import SimpleInferer
from monai.transforms import Activationsd, AsDiscreted, EnsureTyped, Lambdad
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.train.basic_train import BasicTrainTask, Context

from qunet import build_network, deep_supervision_loss
from qunet.config import TrainConfig
from qunet.io import StackError, load_label, load_stack
from qunet.slices import training_pairs
from qunet.training import augmentation

from lib import records
from lib.conf import AppConf

logger = logging.getLogger(__name__)


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
            raise ValueError("no annotated slices to train on: submit a label first")
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
