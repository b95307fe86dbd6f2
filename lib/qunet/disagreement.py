"""QU-net++'s quality index Q = Jaccard(L3 > 0.5, L4 > 0.5) per slice, and level-4 segmentation of a stack."""

from collections.abc import Iterator

import numpy as np
import torch

from qunet.quality import scale_to_unit, stack_range
from qunet.slices import from_network, to_network


def jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample Jaccard of two boolean (N, ...) masks; two empty masks agree fully (Q = 1)."""
    a, b = a.flatten(1), b.flatten(1)
    inter = (a & b).sum(1).double()
    union = (a | b).sum(1).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def prepare(network: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Evaluation mode on `device`, channels-last (faster convolutions on CPU and GPU)."""
    return network.to(device=device, memory_format=torch.channels_last).eval()


def _batches(
    volume: np.ndarray, slices: list[int], image_size: int, batch_size: int, device: torch.device
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Scaled, resized slices a batch at a time: memory is bounded by the batch, not the stack's depth."""
    lo, hi = stack_range(volume)
    for start in range(0, len(slices), batch_size):
        chunk = slices[start : start + batch_size]
        x = to_network(scale_to_unit(volume[:, :, chunk], lo, hi), image_size)
        yield chunk, x.to(device=device, memory_format=torch.channels_last)


@torch.inference_mode()
def disagreement_scores(
    network: torch.nn.Module,
    volume: np.ndarray,
    image_size: int,
    batch_size: int = 16,
    slices: list[int] | None = None,
    device: torch.device | None = None,
) -> np.ndarray:
    """Q per slice of a (X, Y, Z) stack, from one forward pass per batch (levels 3 and 4); NaN where not scored."""
    device = device or next(network.parameters()).device
    q = np.full(volume.shape[2], np.nan)
    todo = list(range(volume.shape[2])) if slices is None else list(slices)
    for chunk, x in _batches(volume, todo, image_size, batch_size, device):
        heads = network(x)
        q[chunk] = jaccard(heads[2] > 0, heads[3] > 0).cpu().numpy()  # logit > 0 is sigmoid > 0.5
    return q


@torch.inference_mode()
def segment(
    network: torch.nn.Module, volume: np.ndarray, image_size: int, batch_size: int = 16, device: torch.device | None = None
) -> np.ndarray:
    """Level-4 label volume with the stack's own (X, Y, Z) shape."""
    device = device or next(network.parameters()).device
    out = np.zeros(volume.shape, np.uint8)
    for chunk, x in _batches(volume, list(range(volume.shape[2])), image_size, batch_size, device):
        out[:, :, chunk] = from_network(torch.sigmoid(network(x)[3]), volume.shape[:2])
    return out
