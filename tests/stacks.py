"""Synthetic stacks and labels written to disk for the fault tests (test_faults.py, test_kill_restart.py)."""

from pathlib import Path

import nibabel as nib
import numpy as np

from qunet_bench.synthetic import generate_stack

AFFINE = np.diag([0.8, 0.8, 4.0, 1.0])


def write_stack(path: Path, shape=(48, 48, 12), seed=0) -> None:
    stack = generate_stack("ct", seed, shape)
    nib.save(nib.Nifti1Image(stack.image.astype(np.int16), AFFINE), path)


def write_label(path: Path, shape, slices: list[int], size: int) -> np.ndarray:
    """A label whose annotated slices hold a square of side `size` (distinct per submission)."""
    label = np.zeros(shape, np.uint8)
    for k in slices:
        label[2 : 2 + size, 3 : 3 + size, k] = 1
    nib.save(nib.Nifti1Image(label, AFFINE), path)
    return label
