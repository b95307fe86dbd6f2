"""Defaults of the QU-net++ method: the one place each setting lives.

The app's `--conf` keys, the CLI flags and the experiment read their defaults from here.
"""

from dataclasses import dataclass

# U-net++ widths as MONAI's BasicUNetPlusPlus takes them: five encoder levels, then the last decoder.
DEFAULT_FEATURES: tuple[int, ...] = (32, 64, 128, 256, 512, 32)


@dataclass(frozen=True)
class QualityConfig:
    median_window: int = 20  # PSNR-inv median filter width (pixels); the paper's code uses 20x20
    blur_percentile: float | None = None  # S0 cut-off for blurriness; None = the stack's mean, as in the paper
    psnr_percentile: float | None = None  # S0 cut-off for PSNR-inv; None = the stack's mean
    epsilon0: float = 0.05  # min distance in normalised (CoV, mean) space between two S0 slices
    max_initial: int = 10  # at most this many S0 slices per stack
    min_initial: int = 5  # S0 is filled up to this many when the quality cut-offs leave fewer (0: never)


@dataclass(frozen=True)
class ModelConfig:
    features: tuple[int, ...] = DEFAULT_FEATURES
    image_size: int = 256  # square in-plane size the network sees
    labels: tuple[str, ...] = ("lesion",)
    dropout: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    # The paper's recipe (section III-B).
    max_epochs: int = 60
    batch_size: int = 20
    learning_rate: float = 1e-4
    augment_range: float = 0.2  # rotation (rad), shift (fraction) and shear, as Keras' 0.2 ranges


@dataclass(frozen=True)
class SelectionConfig:
    q0: float = 0.5  # flag slices whose Jaccard(L3, L4) is below this (the paper's code uses 0.5)
    slices_per_sample: int = 10  # at most this many slices per "Next sample" answer
    score_batch_size: int = 16  # slices per forward pass when scoring or segmenting
    pick: str = "paper"  # Next sample's policy variant (qunet.policy.VARIANTS); "paper": QU-net++ as published
    budget: int = 0  # slices the annotation lead can afford in all; Next sample lowers q0 to fit it (0: no budget)
    stop_tolerance: float = 0.01  # stop signal when the agreement of the last two models differs by less (0: off)
