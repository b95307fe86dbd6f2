"""MONAI Label app `qunet`: QU-net++ active learning on the slices of 3D stacks.

    monailabel start_server --app apps/qunet --studies sample-data [--conf KEY VALUE ...]

The work is done by the `qunet` library; this module only wires its tasks into MONAI Label.
"""

import logging
import os

from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.activelearning.random import Random

from lib import records
from lib.conf import AppConf
from lib.datastore import QUNetDatastore
from lib.dicomweb_datastore import dicomweb_datastore
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
            if settings.MONAI_LABEL_DATASTORE.lower() in ("", "dicomweb"):
                # a DICOMweb server (PACS, Orthanc): series are images, final labels go back as DICOM SEG
                self.studies = self.studies.rstrip("/").strip()
                return dicomweb_datastore(self.studies, self.qconf.label_map())
            logger.warning(f"{settings.MONAI_LABEL_DATASTORE} datastore: the app's label checks and slice records are off")
            return super().init_datastore()
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

    def train(self, request: dict) -> dict:
        result = super().train(request)
        if not self._server_mode:
            # MONAI Label's training subprocess asks the server to re-score one method at a time without
            # queueing, so a scoring run already in progress drops the new model's re-score; POST /scoring/ queues.
            self._local_request("/scoring/", None, "Scoring")
        return result

    def on_save_label(self, image_id: str, label_id: str) -> dict:
        """Answer with the annotated slices (recorded by the datastore); train every `auto_train_after` labels."""
        self.labels_since_training += 1
        if self.qconf.auto_train_after and self.labels_since_training >= self.qconf.auto_train_after:
            self.labels_since_training = 0
            self.async_training(MODEL, enqueue=True)
        return {"annotated_slices": self.datastore().get_image_info(image_id).get(records.ANNOTATED)}
