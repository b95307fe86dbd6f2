"""Which slices a submitted label volume annotates (the app's bookkeeping, kept server-free)."""

from collections.abc import Iterable

import numpy as np


def foreground_slices(label: np.ndarray) -> list[int]:
    """Slices k of a (X, Y, Z) label volume with any foreground."""
    return [int(k) for k in np.flatnonzero(label.reshape(-1, label.shape[2]).any(axis=0))]


def annotated_slices(
    label: np.ndarray,
    previous: Iterable[int] = (),
    served: Iterable[int] | None = None,
    declared: str | Iterable[int] | None = None,
) -> list[int]:
    """The annotated slices after a label submission, sorted.

    - `declared == "all"` (the client says every slice was checked) or a volume never served: every slice;
    - `declared` a list of slice indices: those;
    - otherwise: the slices served for this volume plus every slice holding foreground.
    Slices annotated by earlier submissions (`previous`) stay annotated.
    """
    depth = label.shape[2]
    if declared == "all" or (served is None and declared is None):
        chosen = set(range(depth))
    elif declared is not None:
        chosen = {int(k) for k in declared}
    else:
        chosen = {int(k) for k in served} | set(foreground_slices(label))
    chosen |= {int(k) for k in previous}
    if any(k < 0 or k >= depth for k in chosen):
        raise ValueError(f"annotated slice indices must lie in 0..{depth - 1}")
    return sorted(chosen)
