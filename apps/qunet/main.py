"""MONAI Label app `qunet`: QU-net++ active learning on the slices of 3D stacks.

    monailabel start_server --app apps/qunet --studies sample-data [--conf KEY VALUE ...]

The work is done by the `qunet` library; this module only wires its tasks into MONAI Label, and answers a
client's mistakes with a 4xx status and a message naming the problem (MONAI Label would answer 500). What the
endpoints check before they reach the app is in `qunet_app.server.gate`; background processes are handled by
`qunet_app.server.processes`.
"""

import logging
import os
import threading
from typing import Any

from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.tasks.activelearning.random import Random
from monailabel.utils.async_tasks.utils import tasks as background_tasks

from qunet import __version__
from qunet.config import ReadConfig
from qunet.io import set_read_config
from qunet.threads import CORES_ENV

from qunet_app.datastore import keys
from qunet_app.datastore.dicomweb import open_studies
from qunet_app.datastore.local import QUNetDatastore
from qunet_app.server import gate, processes, uploads
from qunet_app.server.errors import BadRequest, ImageNotFound, NotFound, as_bool, check_tag
from qunet_app.server.status import LoopStatus, register_status_page
from qunet_app.server.tempfolder import use_own_temp_folder
from qunet_app.settings import MODEL, AppConf, model_dir, published_model
from qunet_app.tasks.infer import QUNetInfer
from qunet_app.tasks.pending import signature_or_none
from qunet_app.tasks.progress import watch_model
from qunet_app.tasks.scoring import DisagreementScoring, QualityScoring, training_running
from qunet_app.tasks.strategy import QUNetStrategy, quiet_empty_sample_warning
from qunet_app.tasks.train import QUNetTrain

logger = logging.getLogger(__name__)


class QUNetApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        processes.die_with_server()
        self.qconf = AppConf.from_conf(conf)
        set_read_config(ReadConfig(max_voxels=self.qconf.max_voxels))  # every image and label this process reads
        if self.qconf.cores:  # read by qunet.threads here and in the subprocesses, which inherit it
            os.environ[CORES_ENV] = str(self.qconf.cores)
        self.model_dir = model_dir(app_dir)
        self.published = published_model(app_dir)
        # the server's studies and conf, for the torchrun commands it runs on every GPU of a multi-GPU machine
        self.ranks_args = ["--studies", studies, *[x for k, v in conf.items() for x in ("--conf", str(k), str(v))]]
        self.labels_since_training = 0  # final labels saved since the last auto-training (under _count_lock)
        self._count_lock = threading.Lock()
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="QU-net++",
            description="Annotate the few slices that matter: image quality first, then U-net++ level-3/4 disagreement",
            labels=list(self.qconf.labels),  # a list: the bundled OHIF panel fails on a dict
        )
        if isinstance(self._datastore, QUNetDatastore):
            self._datastore.hold_seconds = self.qconf.hold_seconds
            if len(self.qconf.labels) > 1:
                self._datastore.max_label = len(self.qconf.labels)  # value i = i-th label; one label: any non-zero
        self._sample_lock = threading.Lock()
        self._scoring_lock = threading.Lock()
        self._training_here = threading.Event()  # a training run in this process (a request with run_sync)
        if not processes.in_task_subprocess():
            if processes.launched_as_server():  # not a program that builds the app inside itself (tests); task
                use_own_temp_folder(self.model_dir, app_dir)  # subprocesses inherit the server's folder
            processes.clean_after_training(self.model_dir)
            uploads.prepare_uploads(self.model_dir)
        gate.install(self)
        register_status_page()
        quiet_empty_sample_warning()

    def _load_sessions(self, load: bool = False):
        return None  # sessions (PUT /session/: any files, unpacked on request) are off; infer takes an upload instead

    def model_path(self) -> str | None:
        return self.qconf.model_in_use(self.published)

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            if settings.MONAI_LABEL_DATASTORE.lower() not in ("", "dicomweb"):
                logger.warning(
                    f"{settings.MONAI_LABEL_DATASTORE} datastore: the app's label checks and slice records are off"
                )
                return super().init_datastore()
            self.studies = self.studies.rstrip("/").strip()
        return open_studies(self.studies, self.qconf, settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD)

    def init_infers(self) -> dict:
        return {MODEL: QUNetInfer([p for p in (self.qconf.pretrained_path, self.published) if p], self.qconf)}

    def init_trainers(self) -> dict:
        return {
            MODEL: QUNetTrain(
                self.model_dir,
                self.qconf,
                self.published,
                [os.path.join(self.app_dir, "train_cohort.py"), "--locked", *self.ranks_args],
            )
        }

    def init_strategies(self) -> dict:
        qunet = QUNetStrategy(self.qconf, self.model_path, self.model_dir)
        self.loop_status = LoopStatus(qunet)
        return {MODEL: qunet, "random": qunet if self.qconf.random_strategy == "qunet" else Random()}

    def init_scoring_methods(self) -> dict:
        return {
            "qunet_quality": QualityScoring(self.qconf, self.model_dir),
            "qunet_disagreement": DisagreementScoring(
                self.qconf,
                self.model_path,
                self.model_dir,
                ranks_command=[os.path.join(self.app_dir, "score_cohort.py"), *self.ranks_args],
            ),
        }

    # ---- requests: unknown names are 404, bad values 400, before MONAI Label turns them into 500 ----------------

    def _known(self, kind: str, name: Any, tasks: dict) -> None:
        if not isinstance(name, str) or name not in tasks:
            raise NotFound(f"no {kind} {name!r}; this app has {', '.join(sorted(tasks)) or 'none'}")

    def infer(self, request: dict, datastore=None) -> dict:
        self._known("model", request.get("model"), self._infers)
        image = request.get("image")
        if not isinstance(image, str) or not image:
            raise BadRequest("infer needs an image id (query parameter image) or an uploaded file")
        store = datastore or self.datastore()
        if not gate.known_image(store, image) and not uploads.is_uploaded(image):
            raise ImageNotFound(image)
        if "save_label" in request:
            request = {**request, "save_label": as_bool(request["save_label"], "save_label")}
            if request["save_label"]:
                check_tag(request.get("label_tag", "original"))
        return super().infer(request, datastore)

    def next_sample(self, request: dict) -> dict:
        """One Next sample at a time: the strategy reads and writes the served-slice records (the hold). As MONAI
        Label's, except that an answer without a volume (`"id": ""`, with the reason) reaches the client, not {}."""
        name = request.get("strategy") or "random"
        self._known("strategy", name, self._strategies)
        with self._sample_lock:
            answer = self._strategies[name](request, self.datastore())
        if answer and answer.get("id"):
            answer["path"] = self._datastore.get_image_uri(answer["id"])
        if self._auto_update_scoring:
            self.async_scoring(None)
        return answer or {}

    def info(self) -> dict:
        """MONAI Label's info, plus `qunet`: the app's version, the loop's phase, model, scoring progress, stop signal
        and budget."""
        return {**super().info(), "qunet": {"version": __version__, **self.loop_status.summary(self.datastore())}}

    def on_init_complete(self) -> None:
        super().on_init_complete()
        # re-score a new model once a training leaves it in place (the training subprocess no longer asks: see
        # async_scoring), whatever MONAI_LABEL_AUTO_UPDATE_SCORING says, as the app always did after training
        watch_model(
            self.model_signature,
            lambda: training_running() or self._training_here.is_set(),
            lambda: self.async_scoring("qunet_disagreement"),
        )

    def model_signature(self) -> str | None:
        path = self.model_path()
        return signature_or_none(path) if path else None

    def scoring(self, request: dict, datastore=None):
        self._known("scoring method", request.get("method"), self._scoring_methods)
        return super().scoring(request, datastore)

    def async_scoring(self, method, params=None):
        """Queue a scoring run (a subprocess) only when it has work: some image lacks an up-to-date record, and no
        run for the method is queued and not yet started (that one will see every change made before it starts).
        MONAI Label asks after every Next sample; queueing a run each time would pile up subprocesses under load."""
        if not self._server_mode and method is None and params is None:
            # MONAI Label's training subprocess asks here after training, one method at a time without queueing: a run
            # in progress answered 429 and it logged "[ERROR] Failed To Trigger Scoring ... Already Running". The
            # server re-scores by itself once the training ends (on_init_complete's model watch).
            logger.info("training done: the server queues the new model's disagreement scoring")
            return {}
        if not self._server_mode or params is not None:
            return super().async_scoring(method, params)
        methods = [method] if method else list(self._scoring_methods)
        result = {}
        with self._scoring_lock:
            waiting = {
                t["request"].get("method") for t in background_tasks("scoring") if t.get("status") == "SUBMITTED"
            }
            for m in methods:
                result[m] = None if m in waiting or not self._has_work(m) else super().async_scoring(m)
        return result[method] if method else result

    def _has_work(self, method: str) -> bool:
        task = self._scoring_methods.get(method)
        try:
            return not hasattr(task, "pending") or task.pending(self.datastore())
        except Exception:  # when in doubt, score
            logger.exception(f"cannot tell whether {method} has work")
            return True

    def train(self, request: dict) -> dict:
        self._known("trainer", request.get("model"), self._trainers)
        with processes.training_lock(self.model_dir):  # never two trainings, whichever servers started them
            self._training_here.set()  # (run_sync: in this process; the model watch waits for its end too)
            try:
                return super().train(request)
            finally:
                self._training_here.clear()

    def on_save_label(self, image_id: str, label_id: str, tag: str = DefaultLabelTag.FINAL.value) -> dict:
        """Answer with the annotated slices (recorded by the datastore); train every `auto_train_after` final labels
        (other tags are drafts: nothing to train on)."""
        with self._count_lock:  # the label endpoint runs in a thread pool
            self.labels_since_training += tag == DefaultLabelTag.FINAL.value
            due = bool(self.qconf.auto_train_after) and self.labels_since_training >= self.qconf.auto_train_after
            if due:
                self.labels_since_training = 0
        if due:
            self.async_training(MODEL, enqueue=True)
        return {"annotated_slices": self.datastore().get_image_info(image_id).get(keys.ANNOTATED)}
