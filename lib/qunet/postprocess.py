"""Post-processing of a segmented stack: keep only the largest connected lesion (`postprocess` = "largest").

A model trained on a few slices of one scan finds its lesion and, on other slices, small false ones (vessels,
bowel, edges). When a scan holds one lesion, keeping its largest 3D connected component removes them; when it holds
several, it removes real ones too, so the app's setting decides (measured in docs/learner.md).
"""

import numpy as np
from scipy import ndimage

MODES = ("off", "largest")


def largest_component(labels: np.ndarray) -> np.ndarray:
    """`labels` (X, Y, Z) with everything outside the largest 26-connected component of its foreground set to 0."""
    found, count = ndimage.label(labels > 0, structure=np.ones((3, 3, 3), bool))
    if count <= 1:
        return labels
    sizes = np.bincount(found.ravel())[1:]
    return np.where(found == 1 + int(np.argmax(sizes)), labels, 0).astype(labels.dtype)


def postprocess(labels: np.ndarray, mode: str) -> np.ndarray:
    if mode not in MODES:
        raise ValueError(f"postprocess {mode!r}: one of {', '.join(MODES)}")
    return largest_component(labels) if mode == "largest" else labels
