"""QU-net++'s quality index Q = Jaccard(L3 > 0.5, L4 > 0.5) per slice, and level-4 segmentation of a stack.

The network is run as it was trained: on the stack normalised as a whole (qunet.slices.Intensity), at native
resolution, in windows of the training patch size slid over each slice (MONAI's SlidingWindowInferer, Gaussian
blending of the logits). A model trained on patches and run on whole slices sees other instance-norm
statistics and finds nothing, so scoring, segmentation and evaluation all go through `heads`.
"""

from collections.abc import Iterator

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer

from qunet.slices import CHUNK, Intensity
from qunet.threads import share_cores

OVERLAP = 0.25  # window overlap: the seams of neighbouring windows are blended
# On CPU, forward calls of about one 256x256 slice's worth of pixels were fastest (measured on 2 AVX-512 cores;
# larger calls spill the caches); GPUs take many windows per call.
CPU_PIXELS_PER_CALL = 1 << 16
GPU_WINDOWS_PER_CALL = 64


def jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample Jaccard of two boolean (N, ...) masks; two empty masks agree fully (Q = 1)."""
    a, b = a.flatten(1), b.flatten(1)
    inter = (a & b).sum(1).double()
    union = (a | b).sum(1).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def heads(
    network: torch.nn.Module, x: torch.Tensor, patch_size: int, background: float, which: tuple[int, ...]
) -> list[torch.Tensor]:
    """The selected output heads' logits for a batch of whole normalised slices (N, 1, X, Y), by sliding window."""
    per_call = GPU_WINDOWS_PER_CALL if x.device.type != "cpu" else max(1, CPU_PIXELS_PER_CALL // patch_size**2)
    inferer = SlidingWindowInferer((patch_size, patch_size), per_call, OVERLAP, mode="gaussian", cval=background)

    def predictor(window: torch.Tensor) -> tuple[torch.Tensor, ...]:
        share_cores()  # as many threads as cores other processes leave free (qunet.threads)
        out = network(window.contiguous(memory_format=torch.channels_last))
        out = out if isinstance(out, (list, tuple)) else [out]  # a one-output network (U-net): every head is it
        return tuple(out[i] if len(out) > 1 else out[0] for i in which)

    out = inferer(x, predictor)
    return [out] if isinstance(out, torch.Tensor) else list(out)  # MONAI returns a single output bare


def normalised_chunks(
    volume: np.ndarray, slices: list[int], device: torch.device
) -> Iterator[tuple[list[int], torch.Tensor, float]]:
    """Normalised slices a chunk at a time: memory is bounded by the chunk, not the stack's depth."""
    intensity = Intensity.of(volume)
    for start in range(0, len(slices), CHUNK):
        chunk = slices[start : start + CHUNK]
        x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(intensity.apply(volume[:, :, chunk]), 2, 0)))[:, None]
        yield chunk, x.to(device), intensity.background


def levels_3_and_4(
    network: torch.nn.Module, volume: np.ndarray, patch_size: int, slices: list[int] | None, device: torch.device | None
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """(slice indices, level-3 logits, level-4 logits) a chunk at a time; all slices by default."""
    device = device or next(network.parameters()).device
    todo = list(range(volume.shape[2])) if slices is None else list(slices)
    for chunk, x, background in normalised_chunks(volume, todo, device):
        l3, l4 = heads(network, x, patch_size, background, (2, -1))
        yield chunk, l3, l4


def _labels(l4: torch.Tensor) -> np.ndarray:
    """(n, C, X, Y) logits -> (X, Y, n) uint8: label c+1 where channel c wins above 0.5."""
    best, index = l4.max(dim=1)
    return np.moveaxis(torch.where(best > 0, index + 1, 0).to(torch.uint8).cpu().numpy(), 0, 2)


def _lesion_pixels(l4: torch.Tensor) -> np.ndarray:
    """(n, C, X, Y) logits -> pixels per slice where any label is above 0.5: the predicted lesion area."""
    return (l4.amax(dim=1) > 0).flatten(1).sum(1).cpu().numpy()


@torch.inference_mode()
def disagreement_and_area(
    network: torch.nn.Module,
    volume: np.ndarray,
    patch_size: int,
    slices: list[int] | None = None,
    device: torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Q per slice of a (X, Y, Z) stack and the level-4 lesion pixels per slice (any label) from one pass over levels
    3 and 4; NaN where not scored."""
    q, area = np.full(volume.shape[2], np.nan), np.full(volume.shape[2], np.nan)
    for chunk, l3, l4 in levels_3_and_4(network, volume, patch_size, slices, device):
        q[chunk] = jaccard(l3 > 0, l4 > 0).cpu().numpy()  # logit > 0 is sigmoid > 0.5
        area[chunk] = _lesion_pixels(l4)
    return q, area


def disagreement_scores(
    network: torch.nn.Module,
    volume: np.ndarray,
    patch_size: int,
    slices: list[int] | None = None,
    device: torch.device | None = None,
) -> np.ndarray:
    """Q per slice of a (X, Y, Z) stack from one pass over levels 3 and 4; NaN where not scored."""
    return disagreement_and_area(network, volume, patch_size, slices, device)[0]


@torch.inference_mode()
def segment(
    network: torch.nn.Module,
    volume: np.ndarray,
    patch_size: int,
    slices: list[int] | None = None,
    device: torch.device | None = None,
) -> np.ndarray:
    """Level-4 labels (uint8, (X, Y, n)) of the given slices (default all), in that order."""
    parts = [_labels(l4) for _, _, l4 in levels_3_and_4(network, volume, patch_size, slices, device)]
    return np.concatenate(parts, axis=2) if parts else np.zeros((*volume.shape[:2], 0), np.uint8)


@torch.inference_mode()
def score_and_segment(
    network: torch.nn.Module, volume: np.ndarray, patch_size: int, slices: list[int], device: torch.device | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From one pass, for the given slices in their order: Q, level-4 labels (X, Y, n), and lesion pixels (as
    `disagreement_and_area`)."""
    qs, labels, areas = [], [], []
    for _, l3, l4 in levels_3_and_4(network, volume, patch_size, slices, device):
        qs.append(jaccard(l3 > 0, l4 > 0).cpu().numpy())
        labels.append(_labels(l4))
        areas.append(_lesion_pixels(l4))
    if not qs:
        return np.zeros(0), np.zeros((*volume.shape[:2], 0), np.uint8), np.zeros(0)
    return np.concatenate(qs), np.concatenate(labels, axis=2), np.concatenate(areas)
