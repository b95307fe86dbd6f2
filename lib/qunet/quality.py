"""Model-free per-slice image quality (paper section II-B).

For every slice k of a stack (see qunet.io for the slice axis):
- blurriness = 1 / variance of the 3x3 Laplacian of the slice min-max scaled to [0, 1] (higher = blurrier);
- PSNR-inv = variance of (slice - its median-filtered copy) / the slice's maximum intensity (higher = lower
  contrast), both on the stack scaled to [0, 1] by its 0.5th and 99.5th percentiles, so that a dim slice of
  a bright stack has a low maximum;
- inside the region of interest, on the same stack scaling: coefficient of variation (std / mean; the
  paper's text writes variance / maximum, its code std / mean) and mean.

The region of interest is the given mask (any label > 0) when there is one, else an automatic foreground
mask: voxels above the stack's Otsu threshold, with holes filled slice by slice (the body in CT, the retina
in OCT). A constant slice (no contrast at all) is marked invalid: blurriness 1 / BLUR_FLOOR, PSNR-inv 0, and
it is never selected. A slice whose ROI is empty gets CoV 0 and mean 0.
"""

from dataclasses import asdict, dataclass

import cv2
import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

BLUR_FLOOR = 1e-8  # Laplacian variance below this counts as none: blurriness is then 1 / BLUR_FLOOR
CHUNK = 32  # slices per chunk: bounds memory by the chunk, not the stack's depth
_LAPLACE_2D = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=np.float32)[:, :, None]
_IN_PLANE = ndimage.generate_binary_structure(2, 1)[:, :, None] * np.array([0, 1, 0], bool)[None, None, :]


@dataclass
class SliceQuality:
    blurriness: np.ndarray
    psnr_inv: np.ndarray
    cov: np.ndarray
    mean: np.ndarray
    valid: np.ndarray  # False for constant slices
    roi: str  # "mask" or "auto"

    def to_dict(self) -> dict:
        d = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in asdict(self).items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SliceQuality":
        arrays = {k: np.asarray(d[k]) for k in ("blurriness", "psnr_inv", "cov", "mean", "valid")}
        return cls(**arrays, roi=d["roi"])


def stack_range(volume: np.ndarray) -> tuple[float, float]:
    """Robust intensity range (0.5th, 99.5th percentile) from a sub-sample of the stack."""
    sample = volume[::2, ::2, :]
    lo, hi = np.percentile(sample, (0.5, 99.5))
    if hi <= lo:
        lo, hi = float(volume.min()), float(volume.max())
    return float(lo), float(hi)


def scale_to_unit(volume: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(volume.shape, np.float32)
    return np.clip((volume - lo) / (hi - lo), 0, 1).astype(np.float32)


def _median_filter(slab: np.ndarray, window: int) -> np.ndarray:
    """In-plane median of each slice, on 8-bit levels: OpenCV's O(1) median is ~50x faster than SciPy's.

    OpenCV needs an odd window: an even one is rounded up (20 -> 21)."""
    k = window | 1
    u8 = np.round(slab * 255).astype(np.uint8)
    out = np.empty_like(u8)
    for z in range(u8.shape[2]):
        out[:, :, z] = cv2.medianBlur(np.ascontiguousarray(u8[:, :, z]), k)
    return out.astype(np.float32) / 255


def _blurriness(slab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lo = slab.min(axis=(0, 1), keepdims=True)
    span = slab.max(axis=(0, 1), keepdims=True) - lo
    valid = span[0, 0] > 0
    unit = (slab - lo) / np.where(span > 0, span, 1)
    lap_var = ndimage.correlate(unit, _LAPLACE_2D, mode="mirror").var(axis=(0, 1))
    return 1.0 / np.maximum(lap_var, BLUR_FLOOR), valid


def _psnr_inv(unit: np.ndarray, window: int) -> np.ndarray:
    residual_var = (unit - _median_filter(unit, window)).var(axis=(0, 1))
    peak = unit.max(axis=(0, 1))
    return np.where(peak > 0, residual_var / np.where(peak > 0, peak, 1), 0.0)


def _roi_stats(unit: np.ndarray, roi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    count = roi.sum(axis=(0, 1))
    safe = np.maximum(count, 1)
    mean = (unit * roi).sum(axis=(0, 1)) / safe
    var = ((unit - mean) ** 2 * roi).sum(axis=(0, 1)) / safe
    cov = np.where(mean > 0, np.sqrt(var) / np.where(mean > 0, mean, 1), 0.0)
    return np.where(count > 0, cov, 0.0), np.where(count > 0, mean, 0.0)


def slice_quality(volume: np.ndarray, roi_mask: np.ndarray | None = None, median_window: int = 20) -> SliceQuality:
    """Per-slice quality metrics of a (X, Y, Z) stack; `roi_mask` (same shape, > 0 inside) is optional."""
    if volume.ndim != 3:
        raise ValueError(f"need a (X, Y, Z) stack, got shape {volume.shape}")
    if roi_mask is not None and roi_mask.shape != volume.shape:
        raise ValueError(f"ROI mask shape {roi_mask.shape} differs from the stack's {volume.shape}")
    lo, hi = stack_range(volume)
    otsu = None if roi_mask is not None else _otsu(volume, lo, hi)
    parts = []
    for start in range(0, volume.shape[2], CHUNK):
        slab = volume[:, :, start : start + CHUNK].astype(np.float32)
        unit = scale_to_unit(slab, lo, hi)
        if roi_mask is not None:
            roi = roi_mask[:, :, start : start + CHUNK] > 0
        else:
            roi = ndimage.binary_fill_holes(unit > otsu, structure=_IN_PLANE)
        blur, valid = _blurriness(slab)
        parts.append((blur, _psnr_inv(unit, median_window), *_roi_stats(unit, roi), valid))
    blur, psnr, cov, mean, valid = (np.concatenate(p) for p in zip(*parts))
    psnr = np.where(valid, psnr, 0.0)
    return SliceQuality(blur, psnr, cov, mean, valid, "mask" if roi_mask is not None else "auto")


def _otsu(volume: np.ndarray, lo: float, hi: float) -> float:
    unit = scale_to_unit(volume[::2, ::2, :], lo, hi)
    return float(threshold_otsu(unit.ravel())) if unit.max() > unit.min() else 1.0
