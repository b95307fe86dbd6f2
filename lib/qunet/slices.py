"""Moving between (X, Y, Z) stacks and the network's (N, 1, S, S) slice batches."""

import numpy as np
import torch
import torch.nn.functional as F

from qunet.quality import scale_to_unit, stack_range


def normalise_stack(volume: np.ndarray) -> np.ndarray:
    """The network's intensity scaling: the stack's 0.5-99.5 percentile range mapped to [0, 1]."""
    return scale_to_unit(volume, *stack_range(volume))


def to_network(unit_slab: np.ndarray, image_size: int) -> torch.Tensor:
    """(X, Y, n) scaled slices -> (n, 1, S, S) float tensor, resized with anti-aliasing."""
    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(unit_slab, 2, 0)))[:, None].float()
    if x.shape[-2:] == (image_size, image_size):
        return x
    return F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)


def labels_to_network(label_slab: np.ndarray, image_size: int, num_labels: int) -> torch.Tensor:
    """(X, Y, n) integer labels -> (n, num_labels, S, S) binary float targets, one channel per label value.

    With a single label every non-zero value is foreground (a client may number its segments from 2)."""
    y = torch.from_numpy(np.ascontiguousarray(np.moveaxis(label_slab, 2, 0))).long()
    values = [y > 0] if num_labels == 1 else [(y == v) for v in range(1, num_labels + 1)]
    onehot = torch.stack(values, dim=1).float()
    return F.interpolate(onehot, size=(image_size, image_size), mode="nearest-exact")


def from_network(probs: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    """(n, C, S, S) probabilities -> (X, Y, n) uint8 labels on the original grid: label c+1 where channel c wins above 0.5."""
    probs = F.interpolate(probs.float(), size=shape, mode="bilinear", align_corners=False)
    best, index = probs.max(dim=1)
    label = torch.where(best > 0.5, index + 1, 0).to(torch.uint8)
    return np.moveaxis(label.cpu().numpy(), 0, 2)


def training_pairs(
    volume: np.ndarray, label: np.ndarray, slices: list[int], image_size: int, num_labels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Network inputs (n, 1, S, S) and binary targets (n, num_labels, S, S) for the given slices of one stack."""
    unit = normalise_stack(volume)
    return to_network(unit[:, :, slices], image_size), labels_to_network(label[:, :, slices], image_size, num_labels)
