"""The app's `--conf KEY VALUE` settings (all strings on the command line), with the library's defaults."""

import logging
import os
from dataclasses import dataclass, fields

from qunet.config import DEFAULT_FEATURES, ModelConfig, QualityConfig, ReadConfig, SelectionConfig, TrainConfig
from qunet.neighbours import MODES
from qunet.policy import VARIANTS
from qunet.postprocess import MODES as POSTPROCESS_MODES

MODEL = "qunet"  # the app's model: the name of its tasks, and model/qunet.pt, the file training publishes
MONAI_LABEL_KEYS = ("server_mode",)  # --conf keys MONAI Label itself reads
# the numeric settings' allowed values, (lowest, highest) inclusive; None: no bound
RANGES: dict[str, tuple[float, float | None]] = {
    "median_window": (1, None),
    "blur_percentile": (0, 100),
    "psnr_percentile": (0, 100),
    "epsilon0": (0, None),
    "max_initial": (0, None),
    "min_initial": (0, None),
    "q0": (0, None),
    "slices_per_sample": (1, None),
    "auto_train_after": (0, None),
    "hold_seconds": (0, None),
    "max_voxels": (1, None),
    "budget": (0, None),
    "stop_tolerance": (0, None),
    "max_epochs": (1, None),
    "steps_per_epoch": (1, None),
    "cores": (0, None),
}
logger = logging.getLogger(__name__)


def model_dir(app_dir: str | os.PathLike) -> str:
    """The app's model folder: the published model, training's checkpoints, scoring progress and agreement history."""
    return os.path.join(app_dir, "model")


def published_model(app_dir: str | os.PathLike) -> str:
    return os.path.join(model_dir(app_dir), f"{MODEL}.pt")


def _optional_float(value: str) -> float | None:
    return None if value.lower() in ("", "none", "mean") else float(value)


def _int_list(value: str) -> tuple[int, ...]:
    return tuple(int(v) for v in value.split(","))


def _bool(value: str) -> bool:
    if value.strip().lower() not in ("true", "false"):
        raise ValueError("must be true or false")
    return value.strip().lower() == "true"


def _names(value: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    if not names:
        raise ValueError("labels needs at least one name")
    return names


@dataclass(frozen=True)
class AppConf(QualityConfig):  # the quality and S0 settings, plus:
    labels: tuple[str, ...] = ModelConfig.labels
    q0: float = SelectionConfig.q0
    slices_per_sample: int = SelectionConfig.slices_per_sample
    patch_size: int = ModelConfig.patch_size  # training patches and the inference window, native resolution
    features: tuple[int, ...] = DEFAULT_FEATURES
    pretrained_path: str = ""
    auto_train_after: int = 0  # train after every N submitted labels; 0 = never on its own
    hold_seconds: int = 600  # a served slice is not offered to another client for this long
    # what strategy "random" answers: "qunet" (the app's pick) or "random" (MONAI Label's: a volume, no slices).
    # The OHIF panel of MONAI Label 0.8.5 always asks for "random" (its strategy list has no change handler)
    random_strategy: str = "qunet"
    max_voxels: int = ReadConfig.max_voxels  # largest image or label read (uploads, studies files)
    allow_model_upload: bool = False  # PUT and DELETE /model/qunet: a client replacing or removing the model
    pick: str = SelectionConfig.pick  # Next sample's policy variant (qunet.variants.VARIANTS)
    budget: int = SelectionConfig.budget  # slices affordable in all; q0 is lowered to fit what is left (0: none)
    stop_tolerance: float = SelectionConfig.stop_tolerance  # agreement change below which Next sample signals stop
    # a training's length when the request does not say (auto-training, Slicer's defaults): epochs x updates
    max_epochs: int = TrainConfig.max_epochs
    steps_per_epoch: int = TrainConfig.steps_per_epoch
    neighbour_labels: str = TrainConfig.neighbours  # pseudo-labels for annotated lesion slices' neighbours (MODES)
    postprocess: str = ModelConfig.postprocess  # infer's post-processing (qunet.postprocess.MODES)
    cores: int = 0  # most CPU cores each of the app's processes computes on (0: all it may run on; qunet.threads)

    @classmethod
    def from_conf(cls, conf: dict[str, str]) -> "AppConf":
        parsers = {
            "labels": _names,
            "allow_model_upload": _bool,
            "features": _int_list,
            "pretrained_path": str,
            "blur_percentile": _optional_float,
            "psnr_percentile": _optional_float,
        }
        values = {}
        for f in fields(cls):
            if f.name in conf:
                parse = parsers.get(f.name, type(f.default))
                try:
                    values[f.name] = parse(str(conf[f.name]))
                except ValueError as e:
                    raise ValueError(f"--conf {f.name} {conf[f.name]!r}: {e}") from e
        for key in sorted(set(conf) - {f.name for f in fields(cls)} - set(MONAI_LABEL_KEYS)):
            logger.warning(f"--conf {key}: not a setting of this app, ignored (a typo?)")
        for name, (lo, hi) in RANGES.items():
            value = values.get(name)
            if value is not None and not (lo <= value and (hi is None or value <= hi)):  # NaN fails too
                bound = f"from {lo} to {hi}" if hi is not None else f"{lo} or more"
                raise ValueError(f"--conf {name} must be {bound}, got {conf[name]!r}")
        result = cls(**values)
        if len(result.features) != 6:
            raise ValueError(f"--conf features needs six comma-separated integers, got {result.features}")
        if result.random_strategy not in ("qunet", "random"):
            raise ValueError(f"--conf random_strategy must be qunet or random, got {result.random_strategy!r}")
        if result.pick not in VARIANTS:
            raise ValueError(f"--conf pick must be one of {', '.join(VARIANTS)}, got {result.pick!r}")
        if result.neighbour_labels not in MODES:
            raise ValueError(
                f"--conf neighbour_labels must be one of {', '.join(MODES)}, got {result.neighbour_labels!r}"
            )
        if result.postprocess not in POSTPROCESS_MODES:
            raise ValueError(
                f"--conf postprocess must be one of {', '.join(POSTPROCESS_MODES)}, got {result.postprocess!r}"
            )
        if result.patch_size < 16 or result.patch_size % 16:
            raise ValueError(f"--conf patch_size must be a multiple of 16 (four poolings), got {result.patch_size}")
        return result

    def label_map(self) -> dict[str, int]:
        return {name: i + 1 for i, name in enumerate(self.labels)}

    def model_in_use(self, published: str, explicit: str | None = None) -> str | None:
        """The model the app scores and infers with: the first file that exists of `explicit` (a command's
        --model), the app's published model (training's output), then `pretrained_path`; None without one."""
        for path in (explicit, published, self.pretrained_path):
            if path and os.path.isfile(path):
                return path
        return None
