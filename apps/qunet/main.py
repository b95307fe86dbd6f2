"""MONAI Label app `qunet`: QU-net++ active learning on the slices of 3D stacks.

    monailabel start_server --app apps/qunet --studies sample-data [--conf KEY VALUE ...]

The work is done by the `qunet` library; this module only wires its tasks into MONAI Label.
"""

import logging
import os

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.activelearning.random import Random

from qunet.annotation import annotated_slices
from qunet.io import load_label, load_stack

from lib import records
from lib.conf import AppConf
from lib.datastore import QUNetDatastore
from lib.infers import QUNetInfer
from lib.scoring import DisagreementScoring, QualityScoring
from lib.strategies import QUNetStrategy
from lib.trainers import QUNetTrain

logger = logging.getLogger(__name__)

MODEL = "qunet"


class QUNetApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.qconf = AppConf.from_conf(conf)
        self.model_dir = os.path.join(app_dir, "model")
        self.published = os.path.join(self.model_dir, f"{MODEL}.pt")
        self.labels_since_training = 0
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="QU-net++",
            description="Annotate the few slices that matter: image quality first, then U-net++ level-3/4 disagreement",
            labels=self.qconf.label_map(),
        )

    def model_path(self) -> str | None:
        """The published model if training produced one, else conf pretrained_path, else None."""
        for path in (self.published, self.qconf.pretrained_path):
            if path and os.path.isfile(path):
                return path
        return None

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        from monailabel.config import settings

        return QUNetDatastore(
            self.studies,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def init_infers(self) -> dict:
        return {MODEL: QUNetInfer([p for p in (self.qconf.pretrained_path, self.published) if p], self.qconf)}

    def init_trainers(self) -> dict:
        return {MODEL: QUNetTrain(self.model_dir, self.qconf, self.published)}

    def init_strategies(self) -> dict:
        return {MODEL: QUNetStrategy(self.qconf, self.model_path), "random": Random()}

    def init_scoring_methods(self) -> dict:
        return {
            "qunet_quality": QualityScoring(self.qconf),
            "qunet_disagreement": DisagreementScoring(self.qconf, self.model_path),
        }

    def async_scoring(self, method, params=None):
        # The training subprocess asks the server for each method without queueing, so a scoring run already in
        # progress drops the re-score of the new model; POST /scoring/ queues every method instead.
        if self._server_mode or method:
            return super().async_scoring(method, params)
        return self._local_request("/scoring/", params, "Scoring")

    def on_save_label(self, image_id: str, label_id: str) -> dict:
        """Record which slices the new label annotates; train every `auto_train_after` labels if asked."""
        ds = self.datastore()
        info = ds.get_image_info(image_id)
        label_info = ds.get_label_info(label_id, "final")
        stack = load_stack(ds.get_image_uri(image_id))
        label = load_label(ds.get_label_uri(label_id, "final"), stack)
        served_all = info.get(records.SERVED) or {}
        client = str(label_info.get("client_id") or "anonymous")
        mine = served_all.get(client) or {}
        served = mine.get("slices") if mine else sorted({k for s in served_all.values() for k in s["slices"]}) or None
        annotated = annotated_slices(label, info.get(records.ANNOTATED, []), served, label_info.get("annotated_slices"))
        if mine:
            served_all[client] = {**mine, "submitted": True}
        ds.update_image_info(image_id, {records.ANNOTATED: annotated, records.SERVED: served_all})

        self.labels_since_training += 1
        if self.qconf.auto_train_after and self.labels_since_training >= self.qconf.auto_train_after:
            self.labels_since_training = 0
            self.async_training(MODEL, enqueue=True)
        return {"annotated_slices": annotated}
