"""Moving between (X, Y, Z) stacks and the network: intensities, annotated slices, and training patches.

The network sees every stack the same way in training, scoring and segmentation: intensities normalised per
stack (`Intensity`), slices at their native resolution (no resizing: a 20 px nodule in a 512 px slice
stays 20 px), in square patches of `patch_size` pixels. Training draws patches (a fixed share holding lesion,
as nnU-Net's foreground oversampling); inference slides a window of the same size over whole slices
(qunet.disagreement), so instance normalisation sees the same kind of input in both.
"""

from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms import RandSpatialCropd

CLIP_PERCENTILES = (0.5, 99.5)
CHUNK = 32  # slices at a time: memory bounded by a chunk, not the stack's depth


@dataclass(frozen=True)
class Intensity:
    """A stack's intensity normalisation: clip to its 0.5-99.5 percentile range, then z-score.

    Per-volume z-scoring is nnU-Net's scheme for MRI; clipping first keeps CT's extreme values (air, metal, bone)
    from dominating the statistics, so one scheme serves CT, MRI and OCT without knowing the modality."""

    lo: float
    hi: float
    mean: float
    std: float

    @classmethod
    def of(cls, volume: np.ndarray) -> "Intensity":
        step = 2 if volume.size > 1 << 22 else 1  # percentiles of a sub-sample: the same range, an eighth of the copy
        lo, hi = (float(v) for v in np.percentile(volume[::step, ::step, ::step], CLIP_PERCENTILES))
        total = square = 0.0
        for start in range(0, volume.shape[2], CHUNK):
            chunk = np.clip(volume[:, :, start : start + CHUNK], lo, hi, dtype=np.float64)
            total, square = total + chunk.sum(), square + (chunk**2).sum()
        mean = total / volume.size
        std = float(np.sqrt(max(square / volume.size - mean**2, 0.0)))
        return cls(lo, hi, mean, std if std > 1e-6 * max(abs(hi), abs(lo), 1.0) else 1.0)

    def apply(self, array: np.ndarray) -> np.ndarray:
        return ((np.clip(array, self.lo, self.hi, dtype=np.float32) - self.mean) / self.std).astype(np.float32)

    @property
    def background(self) -> float:
        """The lowest normalised value: what pads a slice smaller than a patch, in training and inference."""
        return (self.lo - self.mean) / self.std


def label_channels(label: np.ndarray, num_labels: int) -> np.ndarray:
    """(X, Y, ...) integer labels -> (num_labels, X, Y, ...) binary float32, one channel per label value.

    With a single label every non-zero value is foreground (a client may number its segments from 2)."""
    if num_labels == 1:
        return (label > 0)[None].astype(np.float32)
    return np.stack([label == v for v in range(1, num_labels + 1)]).astype(np.float32)


@dataclass
class TrainingSlice:
    """One annotated slice at native resolution: image (1, X, Y) normalised as its stack, target (C, X, Y)."""

    image: np.ndarray
    target: np.ndarray
    background: float  # the normalised stack's lowest value: what pads a slice smaller than a patch
    stack: str = ""  # the stack it comes from: lesion patches are shared out between stacks
    index: int = 0  # its slice index in that stack

    @property
    def has_foreground(self) -> bool:
        return bool(self.target.any())


def training_slices(
    volume: np.ndarray, label: np.ndarray, slices: list[int], num_labels: int, name: str = ""
) -> list[TrainingSlice]:
    """The annotated slices of one stack, normalised as the whole stack is for inference."""
    return labelled_slices(volume, [(k, label[:, :, k]) for k in slices], num_labels, name)


def labelled_slices(
    volume: np.ndarray, targets: list[tuple[int, np.ndarray]], num_labels: int, name: str = ""
) -> list[TrainingSlice]:
    """Slices of one stack given as (slice index, (X, Y) label) pairs, normalised as the whole stack is for
    inference."""
    intensity = Intensity.of(volume)
    return [
        TrainingSlice(
            intensity.apply(volume[None, :, :, k]), label_channels(target, num_labels), intensity.background, name, k
        )
        for k, target in targets
    ]


class PatchSampler:
    """Batches of `patch_size` patches from annotated slices, a share `foreground` of them holding lesion.

    Each patch first picks its slice: with probability `foreground` (when any slice holds lesion) a lesion slice,
    cropped so that a random lesion pixel lies at a random place in the patch (at least an eighth of the patch from
    its border), else any slice, cropped anywhere (RandSpatialCropd). Not centred on the lesion pixel: a network
    trained on lesion always at the patch's centre learns that place (zero padding tells it where it is), and
    sliding-window inference, whose windows hold a small lesion anywhere, found a 20 px nodule only in windows
    centred on it (docs/learner.md). Lesion slices are drawn stack by stack (a stack with lesion at random, then one of
    its lesion slices): a nodule annotated on one slice gets as many patches as a tumour annotated on six. Drawing
    the lesion share per batch, not per slice, keeps lesions in the batches when 2 of 20 annotated slices hold any.
    Slices smaller than a patch are padded with the stack's lowest value, as sliding-window inference pads them."""

    def __init__(self, slices: list[TrainingSlice], patch_size: int, foreground: float, seed: int) -> None:
        if not slices:
            raise ValueError("no annotated slices to sample patches from")
        self.items = [_padded(s, patch_size) for s in slices]
        self.size = patch_size
        self.margin = patch_size // 8
        by_stack: dict[str, list[int]] = {}
        self.lesion_pixels: dict[int, np.ndarray] = {}  # slice -> (n, 2) lesion pixel coordinates
        for i, s in enumerate(slices):
            if s.has_foreground:
                by_stack.setdefault(s.stack, []).append(i)
                self.lesion_pixels[i] = np.argwhere(self.items[i]["label"].numpy().any(axis=0))
        self.lesion = list(by_stack.values())
        self.foreground = foreground
        self.rng = np.random.default_rng(seed)
        self.anywhere = RandSpatialCropd(("image", "label"), (patch_size, patch_size), random_size=False)
        self.anywhere.set_random_state(seed=int(self.rng.integers(2**31)))

    def patch(self) -> dict[str, torch.Tensor]:
        if self.lesion and self.rng.random() < self.foreground:
            stack = self.lesion[int(self.rng.integers(len(self.lesion)))]
            return self._around_lesion(int(self.rng.choice(stack)))
        return self.anywhere(self.items[int(self.rng.integers(len(self.items)))])

    def _around_lesion(self, i: int) -> dict[str, torch.Tensor]:
        pixels, item = self.lesion_pixels[i], self.items[i]
        corner = []
        for pixel, extent in zip(pixels[int(self.rng.integers(len(pixels)))], item["image"].shape[1:]):
            low = max(0, int(pixel) - (self.size - 1 - self.margin))
            high = max(low, min(int(pixel) - self.margin, extent - self.size))
            corner.append(int(self.rng.integers(low, high + 1)))
        x, y = corner
        return {k: v[:, x : x + self.size, y : y + self.size] for k, v in item.items()}


def _padded(s: TrainingSlice, patch_size: int) -> dict[str, torch.Tensor]:
    """The slice as tensors, padded up to the patch size: image with its lowest value, target with 0."""
    pad = [(0, 0)] + [
        ((patch_size - n + 1) // 2, (patch_size - n) // 2) if n < patch_size else (0, 0) for n in s.image.shape[1:]
    ]
    image = np.pad(s.image, pad, constant_values=s.background)
    return {"image": torch.from_numpy(image), "label": torch.from_numpy(np.pad(s.target, pad))}
