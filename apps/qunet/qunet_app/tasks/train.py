"""Trainer `qunet`: the library's training recipe (qunet.training) on the annotated slices of the datastore.

MONAI Label runs it in a subprocess. After each epoch it publishes the model atomically (a stopped training keeps
its progress) and writes the train stats GET /info/ shows (`train_stats`: epoch, total_epochs, loss, Dice, time,
as 3D Slicer's progress bars read them); at the end it appends an entry to the history (history.json beside the
model): how many slices it was trained on, and the held-out Dice of the model it replaces on the slices
annotated since that one was trained.

Inside a torch.distributed group (train_cohort.py under torchrun) every rank trains its share of each batch and
rank 0 alone writes. A request with `"multi_gpu": true` on a machine with two or more GPUs runs train_cohort.py
with one rank per GPU (qunet_app.tasks.ranks.run_ranks); with fewer it trains in this process.
"""

import io
import json
import logging
import os
import time
from dataclasses import asdict, replace
from typing import Any

import torch
import torch.distributed as dist
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from qunet import build_network
from qunet.config import TrainConfig
from qunet.disagreement import segment
from qunet.io import StackError, file_signature, load_label, load_stack
from qunet.neighbours import neighbour_slices
from qunet.network import default_device, load_weights, prepare
from qunet.slices import TrainingSlice, training_slices
from qunet.training import EpochStats, seed_everything, train

from qunet_app.datastore import keys
from qunet_app.datastore.files import atomic_write
from qunet_app.server.errors import BadRequest, Conflict, as_bool, as_float, as_int, check_device
from qunet_app.settings import AppConf
from qunet_app.tasks.progress import read_json
from qunet_app.tasks.ranks import run_ranks

logger = logging.getLogger(__name__)

NOTHING_TO_TRAIN = "no annotated slices to train on: submit a label first"
REQUEST_KEYS = {  # request key -> TrainConfig field
    "max_epochs": "max_epochs",
    "steps_per_epoch": "steps_per_epoch",
    "train_batch_size": "batch_size",
    "learning_rate": "learning_rate",
    "foreground": "foreground",
    "augment": "augment",
}


def check_train_request(request: dict[str, Any]) -> dict[str, Any]:
    """The request's training settings, checked; raises BadRequest naming the first bad one."""
    checks = {
        "max_epochs": lambda v: as_int(v, "max_epochs", 1, 100000),
        "steps_per_epoch": lambda v: as_int(v, "steps_per_epoch", 1, 100000),
        "train_batch_size": lambda v: as_int(v, "train_batch_size", 1, 4096),
        "learning_rate": lambda v: as_float(v, "learning_rate", 1e-12, 10.0),
        "foreground": lambda v: as_float(v, "foreground", 0.0, 1.0),
        "augment": lambda v: as_bool(v, "augment"),
        "pretrained": lambda v: as_bool(v, "pretrained"),
        "multi_gpu": lambda v: as_bool(v, "multi_gpu"),
        "seed": lambda v: as_int(v, "seed", 0, 2**31 - 1),
        "device": check_device,
    }
    checked = dict(request)
    for key, check in checks.items():
        if key in checked:  # config() offers no list ("choose one") values: a list is a bad value
            checked[key] = check(checked[key])
    for key in ("train_ds", "val_ds", "tracking_uri"):  # server-side paths: not a client's to choose
        if checked.get(key):
            raise BadRequest(f"{key} is not supported by this app")
    return checked


class QUNetTrain(TrainTask):
    def __init__(
        self, model_dir: str, conf: AppConf, publish_path: str, ranks_command: list[str] | None = None
    ) -> None:
        super().__init__("Train the U-net++ on the annotated slices (patches, Dice + CE on all four heads, AdamW)")
        self.ranks_command = ranks_command  # train_cohort.py with the server's studies and conf: what multi_gpu runs
        self.conf = conf
        self.model_dir = model_dir
        self.publish_path = publish_path
        self.stats_path = os.path.join(model_dir, "train_stats.json")
        self.history_path = os.path.join(model_dir, "history.json")
        self.trained_path = os.path.join(model_dir, "trained_slices.json")  # what the published model was trained on

    def defaults(self) -> TrainConfig:
        """The recipe, with the training length the app's conf gives."""
        return TrainConfig(
            max_epochs=self.conf.max_epochs,
            steps_per_epoch=self.conf.steps_per_epoch,
            neighbours=self.conf.neighbour_labels,
        )

    def config(self) -> dict[str, Any]:
        d = self.defaults()
        return {
            "max_epochs": d.max_epochs,
            "steps_per_epoch": d.steps_per_epoch,
            "train_batch_size": d.batch_size,
            "learning_rate": d.learning_rate,
            "foreground": d.foreground,
            "augment": d.augment,
            "pretrained": True,
            "multi_gpu": False,
        }

    def stats(self) -> dict[str, Any]:
        return read_json(self.stats_path, {})

    def history(self) -> list[dict[str, Any]]:
        return read_json(self.history_path, [])

    # ---- one training run --------------------------------------------------------------------------------------

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        request = check_train_request(request)
        gpus = torch.cuda.device_count()
        if request.get("multi_gpu") is True and gpus > 1 and self.ranks_command and not dist.is_initialized():
            logger.info(f"training over {gpus} GPUs")
            keep = {k: v for k, v in request.items() if k in REQUEST_KEYS or k in ("seed", "pretrained")}
            return run_ranks([*self.ranks_command, "--request", json.dumps(keep)], gpus)
        leader = not dist.is_initialized() or dist.get_rank() == 0  # the one rank that writes
        settings = replace(self.defaults(), **{f: request[k] for k, f in REQUEST_KEYS.items() if k in request})
        device = torch.device(request["device"]) if request.get("device") else default_device()
        annotated = self._annotated(datastore)
        slices = [s for image_slices in annotated.values() for s in image_slices[1]]
        if not slices:
            raise Conflict(NOTHING_TO_TRAIN)
        network, start_from = self._start(bool(request.get("pretrained", True)))
        heldout = (
            self._heldout(network, annotated, datastore, device) if start_from == self.publish_path and leader else None
        )
        pseudo = self._neighbours(datastore, annotated, settings.neighbours, network if start_from else None, device)
        logger.info(
            f"training on {len(slices)} annotated slices of {len(annotated)} volumes "
            f"({sum(s.has_foreground for s in slices)} with foreground) and {len(pseudo)} pseudo-labelled "
            f"neighbours, from {start_from or 'scratch'}"
        )
        started = time.time()
        seed = int(request.get("seed", 0))
        seed_everything(seed)
        if leader:
            os.makedirs(self.model_dir, exist_ok=True)
            atomic_write(json.dumps({k: v[0] for k, v in annotated.items()}), self.trained_path)

        def end_of_epoch(epoch: EpochStats) -> None:  # published every epoch: a stopped training keeps its progress
            self._publish(network)
            self._write_stats(epoch, started, heldout, len(slices))

        history = train(
            network,
            slices + pseudo,
            settings,
            self.conf.patch_size,
            seed=seed,
            device=device,
            on_epoch=end_of_epoch if leader else None,
        )
        last = history[-1]
        entry = {
            "ts": int(time.time()),
            "model": file_signature(self.publish_path) if leader else None,
            "slices": len(slices),
            "volumes": len(annotated),
            "lesion_slices": sum(s.has_foreground for s in slices),
            "neighbour_slices": len(pseudo),
            "heldout": heldout,
            "train_dice": round(last.dice, 4),
            "loss": round(last.loss, 4),
            "steps": last.epoch * settings.steps_per_epoch,
            "seconds": round(time.time() - started, 1),
        }
        if leader:
            atomic_write(json.dumps(self.history() + [entry]), self.history_path)
        return entry

    def _annotated(self, datastore: Datastore) -> dict[str, tuple[list[int], list[TrainingSlice]]]:
        """image id -> (annotated slice indices, their training slices), for every image with a final label."""
        out = {}
        for image_id in datastore.get_labeled_images():
            try:
                stack = load_stack(datastore.get_image_uri(image_id))
                label = load_label(datastore.get_label_uri(image_id, "final"), stack)
            except StackError as e:
                logger.error(f"skipping {image_id} in training: {e}")
                continue
            ks = keys.annotated(datastore, image_id, datastore.get_image_info(image_id), stack.num_slices)
            if ks:
                out[image_id] = (ks, training_slices(stack.array, label, ks, len(self.conf.labels), image_id))
        return out

    def _neighbours(
        self,
        datastore: Datastore,
        annotated: dict[str, tuple[list[int], list[TrainingSlice]]],
        mode: str,
        network: torch.nn.Module | None,
        device: torch.device,
    ) -> list[TrainingSlice]:
        """Pseudo-labelled neighbours of the annotated lesion slices (qunet.neighbours); in "model" mode labelled by
        the model training starts from (none from scratch). Each stack is read again, one at a time, rather than
        kept from `_annotated`: memory stays one stack, however many volumes are labelled."""
        if mode == "off" or (mode == "model" and network is None):
            return []
        if network is not None:
            prepare(network, device)
        out = []
        for image_id, (ks, _) in annotated.items():
            stack = load_stack(datastore.get_image_uri(image_id))
            label = load_label(datastore.get_label_uri(image_id, "final"), stack)
            out += neighbour_slices(
                stack.array, label, ks, len(self.conf.labels), image_id, mode, network, self.conf.patch_size, device
            )
        return out

    def _start(self, pretrained: bool) -> tuple[torch.nn.Module, str | None]:
        """The network to train and where its weights came from: the published model if usable (training goes on
        from it, as the app's loop does), else conf pretrained_path (which must be usable), else fresh weights."""
        network = build_network(self.conf.features, len(self.conf.labels))
        if not pretrained:
            return network, None
        if os.path.exists(self.publish_path):
            try:
                return load_weights(network, self.publish_path), self.publish_path
            except ValueError as e:
                logger.warning(f"not continuing from the published model: {e}")
        if self.conf.pretrained_path:
            if not os.path.exists(self.conf.pretrained_path):
                raise Conflict(f"--conf pretrained_path {self.conf.pretrained_path}: no such file")
            try:
                return load_weights(network, self.conf.pretrained_path), self.conf.pretrained_path
            except ValueError as e:
                raise Conflict(f"--conf pretrained_path cannot be used: {e}") from e
        return network, None

    def _heldout(
        self, network: torch.nn.Module, annotated: dict, datastore: Datastore, device: torch.device
    ) -> dict | None:
        """Dice of the published model on the slices annotated since it was trained: slices it never saw."""
        seen = read_json(self.trained_path, {})
        prepare(network, device)
        overlap = size = count = lesion = 0
        for image_id, (ks, _) in annotated.items():
            new = [k for k in ks if k not in set(seen.get(image_id, []))]
            if not new:
                continue
            stack = load_stack(datastore.get_image_uri(image_id))
            truth = load_label(datastore.get_label_uri(image_id, "final"), stack)[:, :, new] > 0
            found = segment(network, stack.array, self.conf.patch_size, new, device) > 0
            overlap, size = overlap + 2 * int((found & truth).sum()), size + int(found.sum() + truth.sum())
            count, lesion = count + len(new), lesion + int(truth.any(axis=(0, 1)).sum())
        if not count:
            return None
        return {"dice": round(overlap / size, 4) if size else 1.0, "slices": count, "lesion_slices": lesion}

    def _write_stats(self, epoch: EpochStats, started: float, heldout: dict | None, slices: int) -> None:
        logger.info(f"epoch {epoch.epoch}/{epoch.epochs}: loss {epoch.loss:.4f}, training Dice {epoch.dice:.3f}")
        stats = {
            **asdict(epoch),
            "total_epochs": epoch.epochs,
            "best_metric": round(epoch.dice, 4),
            "total_time": f"{epoch.seconds:.0f} s",
            "start_ts": int(started),
            "slices": slices,
            "heldout": heldout,
        }
        os.makedirs(self.model_dir, exist_ok=True)
        atomic_write(json.dumps(stats), self.stats_path)

    def _publish(self, network: torch.nn.Module) -> None:
        buffer = io.BytesIO()
        torch.save({"model": network.state_dict()}, buffer)
        atomic_write(buffer.getvalue(), self.publish_path)  # scoring and inference never read half a model
