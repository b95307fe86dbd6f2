"""Pseudo-labels for the slices next to annotated lesion slices: learning from annotated neighbours between rounds.

A lesion drawn on slice k usually goes on into k - 1 and k + 1 (lesions in the real stacks here span 3 to 11
slices), so each annotated lesion slice can lend its unannotated neighbours a label, three lesion slices for the
cost of one. Two ways, by `mode`:

- "copy": the neighbour takes the annotated slice's label as it is (nearest-slice propagation); wrong where the
  lesion ends or changes shape, but needs no model, so it also serves the first round;
- "model": the current model's level-4 segmentation of the neighbour, kept only within a few pixels of the
  annotated lesion (the annotation says where the lesion can be); a neighbour where nothing is left gets no label.

Only neighbours of lesion slices get one: next to a lesion-free slice, a lesion may begin, and the annotator said
nothing about it. In the multi-round benchmark both modes trained worse models than the annotated slices alone
(docs/experiment-log.md), so the app's `neighbour_labels` is "off" by default.
"""

import numpy as np
import torch
from scipy.ndimage import binary_dilation

from qunet.disagreement import segment
from qunet.slices import TrainingSlice, labelled_slices

MODES = ("off", "copy", "model")
MARGIN = 3  # pixels around the annotated lesion within which the model's segmentation of a neighbour is kept


def neighbour_targets(label: np.ndarray, annotated: list[int]) -> dict[int, int]:
    """Unannotated slice -> the annotated lesion slice next to it that lends it a label (the lower one on ties)."""
    done, lenders = set(annotated), {}
    for k in sorted(annotated):
        if not label[:, :, k].any():
            continue
        for j in (k - 1, k + 1):
            if 0 <= j < label.shape[2] and j not in done:
                lenders.setdefault(j, k)
    return lenders


def neighbour_slices(
    volume: np.ndarray,
    label: np.ndarray,
    annotated: list[int],
    num_labels: int,
    name: str,
    mode: str,
    network: torch.nn.Module | None = None,
    patch_size: int = 0,
    device: torch.device | None = None,
) -> list[TrainingSlice]:
    """Training slices for the neighbours of one stack's annotated lesion slices, labelled as `mode` says; none for
    "off", nor for "model" before there is a model."""
    if mode not in MODES:
        raise ValueError(f"neighbour labels {mode!r}: one of {', '.join(MODES)}")
    lenders = neighbour_targets(label, annotated)
    if mode == "off" or not lenders or (mode == "model" and network is None):
        return []
    ks = sorted(lenders)
    pseudo = np.zeros((*label.shape[:2], len(ks)), label.dtype)
    found = segment(network, volume, patch_size, ks, device) if mode == "model" else None
    for i, j in enumerate(ks):
        lent = label[:, :, lenders[j]]
        if found is None:
            pseudo[:, :, i] = lent
        else:
            near = binary_dilation(lent > 0, iterations=MARGIN)
            pseudo[:, :, i] = np.where(near, found[:, :, i], 0)
    return labelled_slices(
        volume, [(j, pseudo[:, :, i]) for i, j in enumerate(ks) if pseudo[:, :, i].any()], num_labels, name
    )
