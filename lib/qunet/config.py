"""Defaults of the QU-net++ method: the one place each setting lives.

The app's `--conf` keys, the CLI flags and the experiment read their defaults from here.
"""

from dataclasses import dataclass

# U-net++ widths as MONAI's BasicUNetPlusPlus takes them: five encoder levels, then the last decoder. A quarter of
# the paper's widths (a sixteenth of its cost per pixel), so training and scoring fit a CPU (docs/method.md).
DEFAULT_FEATURES: tuple[int, ...] = (8, 16, 32, 64, 128, 8)
PAPER_FEATURES: tuple[int, ...] = (32, 64, 128, 256, 512, 32)


@dataclass(frozen=True)
class QualityConfig:
    median_window: int = 20  # PSNR-inv median filter width (pixels); the paper's code uses 20x20
    blur_percentile: float | None = None  # S0 cut-off for blurriness; None = the stack's mean, as in the paper
    psnr_percentile: float | None = None  # S0 cut-off for PSNR-inv; None = the stack's mean
    epsilon0: float = 0.05  # min distance in normalised (CoV, mean) space between two S0 slices
    max_initial: int = 10  # at most this many S0 slices per stack
    min_initial: int = 5  # S0 is filled up to this many when the quality cut-offs leave fewer (0: never)


@dataclass(frozen=True)
class ReadConfig:
    # Largest image or label read, in voxels (all axes and channels): a header claiming more is refused before any
    # memory is taken, and compressed data may not inflate beyond what the header's size allows.
    max_voxels: int = 512 * 512 * 1024


@dataclass(frozen=True)
class ModelConfig:
    features: tuple[int, ...] = DEFAULT_FEATURES
    patch_size: int = 96  # square patches at native resolution, in training and as the inference window
    labels: tuple[str, ...] = ("lesion",)
    dropout: float = 0.0
    # what infer does to a segmented stack (qunet.postprocess.MODES): "largest" keeps the largest connected lesion
    postprocess: str = "off"


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe: nnU-Net's for little data (docs/method.md); settings chosen on sample-data's real
    stacks and confirmed on confirmation-data's (docs/learner.md)."""

    max_epochs: int = 8  # 400 updates: as good as 500 on the choosing stacks, Train within 2 minutes on 2 cores
    steps_per_epoch: int = 50  # an epoch is a fixed number of updates, whatever the number of annotated slices
    batch_size: int = 8
    learning_rate: float = 3e-3  # AdamW, decayed to 0 by the poly schedule (1 - step / steps) ** 0.9
    weight_decay: float = 3e-5
    # share of patches holding a lesion pixel (when any annotated slice holds lesion); the rest lie anywhere and
    # teach what is not lesion. nnU-Net's default (docs/experiment-log.md)
    foreground: float = 0.33
    augment: bool = True  # rotation, scaling, flips, intensity noise and gamma
    # pseudo-labels for the unannotated neighbours of annotated lesion slices, added by whoever builds the training
    # set (qunet.neighbours.MODES: "off", "copy", "model"; docs/experiment-log.md)
    neighbours: str = "off"


# On a GPU: the paper's widths, larger patches and batches, more updates (python -m qunet curve --preset gpu).
GPU_MODEL = ModelConfig(features=PAPER_FEATURES, patch_size=192)
GPU_TRAIN = TrainConfig(max_epochs=40, batch_size=24)


@dataclass(frozen=True)
class SelectionConfig:
    q0: float = 0.5  # flag slices whose Jaccard(L3, L4) is below this (the paper's code uses 0.5)
    slices_per_sample: int = 10  # at most this many slices per "Next sample" answer
    # Next sample's policy variant (qunet.variants.VARIANTS): "lesion" (coverage steered by quality, then by predicted
    # lesion; docs/method.md) or "paper" (QU-net++ as published)
    pick: str = "lesion"
    budget: int = 0  # slices the annotation lead can afford in all; Next sample lowers q0 to fit it (0: no budget)
    stop_tolerance: float = 0.01  # stop signal when the agreement of the last two models differs by less (0: off)
