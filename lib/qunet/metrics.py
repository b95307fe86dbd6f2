"""Segmentation metrics of the paper's Table I (Pr, Re, J, D, Acc), per slice and per stack.

Built on MONAI's confusion-matrix metrics. Where a ratio is 0/0 (nothing predicted and nothing there),
prediction and truth agree fully and the value is 1; a 0/0 with something on one side only is 0.
"""

import numpy as np
import torch
from monai.metrics import compute_confusion_matrix_metric, get_confusion_matrix

METRICS = {
    "precision": "precision",
    "recall": "sensitivity",
    "jaccard": "threat score",
    "dice": "f1 score",
    "accuracy": "accuracy",
}


def _from_confusion(cm: torch.Tensor) -> dict[str, np.ndarray]:
    both_empty = (cm[..., 0] + cm[..., 1] + cm[..., 3]) == 0  # no tp, fp or fn
    out = {}
    for name, monai_name in METRICS.items():
        value = compute_confusion_matrix_metric(monai_name, cm)
        value = torch.where(torch.isnan(value), both_empty.float(), value)
        out[name] = value.reshape(-1).numpy()
    return out


def _as_batch(mask: np.ndarray) -> torch.Tensor:
    """(X, Y, Z) mask -> (Z, 1, X, Y) binary tensor."""
    return torch.from_numpy(np.moveaxis(np.asarray(mask) > 0, 2, 0)[:, None].astype(np.float32))


def slice_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, np.ndarray]:
    """Each metric for every slice of two (X, Y, Z) foreground masks."""
    return _from_confusion(get_confusion_matrix(_as_batch(pred), _as_batch(truth)))


def stack_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Each metric over all voxels of the given slices pooled together."""
    cm = get_confusion_matrix(_as_batch(pred), _as_batch(truth)).sum(dim=0, keepdim=True)
    return {k: float(v[0]) for k, v in _from_confusion(cm).items()}
