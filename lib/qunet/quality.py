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

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import cv2
import numpy as np
from skimage.filters import threshold_otsu

BLUR_FLOOR = 1e-8  # Laplacian variance below this counts as none: blurriness is then 1 / BLUR_FLOOR
CHUNK = 32  # slices per chunk: bounds memory by the chunk, not the stack's depth


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


def stack_range(volume: np.ndarray) -> tuple[float, float]:
    """Robust intensity range (0.5th, 99.5th percentile) from a sub-sample of the stack.

    For float32 stacks (what qunet.io loads) the percentiles are computed exactly, chunk by chunk, so memory does
    not grow with the stack's depth; the values equal NumPy's np.percentile of the same sample."""
    sample = volume[::2, ::2, :]
    if volume.dtype == np.float32 and sample.size:
        lo, hi = _percentiles(sample, (0.5, 99.5))
    else:
        lo, hi = np.percentile(sample, (0.5, 99.5))
    if hi <= lo:
        lo, hi = float(volume.min()), float(volume.max())
    return float(lo), float(hi)


def _chunks(sample: np.ndarray, depth: int = CHUNK):
    return lambda: (sample[:, :, z : z + depth] for z in range(0, sample.shape[2], depth))


def _sort_keys(values: np.ndarray) -> np.ndarray:
    """float32 -> uint32 keys in the same order as the floats (sign bit flipped, negatives inverted)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).ravel()
    return np.where(bits & np.uint32(0x80000000), ~bits, bits | np.uint32(0x80000000))


def _from_key(key: int) -> np.float32:
    key = np.uint32(key)
    bits = key & np.uint32(0x7FFFFFFF) if key & np.uint32(0x80000000) else ~key
    return np.array(bits, np.uint32).view(np.float32)[()]


def _order_statistics(chunks, ranks: list[int]) -> dict[int, np.float32]:
    """Exact k-th smallest float32 values (0-based) by a two-pass radix select on 16-bit halves of the keys."""
    high = np.zeros(1 << 16, np.int64)
    for chunk in chunks():
        high += np.bincount(_sort_keys(chunk) >> 16, minlength=1 << 16)
    cumulative = np.cumsum(high)
    wanted: dict[int, list[tuple[int, int]]] = {}
    for r in ranks:
        h = int(np.searchsorted(cumulative, r, side="right"))
        wanted.setdefault(h, []).append((r, r - (int(cumulative[h - 1]) if h else 0)))
    low = {h: np.zeros(1 << 16, np.int64) for h in wanted}
    for chunk in chunks():
        keys = _sort_keys(chunk)
        top = keys >> 16
        for h, counts in low.items():
            inside = keys[top == h]
            if inside.size:
                counts += np.bincount(inside & 0xFFFF, minlength=1 << 16)
    out = {}
    for h, items in wanted.items():
        cumulative_low = np.cumsum(low[h])
        for r, within in items:
            out[r] = _from_key((h << 16) | int(np.searchsorted(cumulative_low, within, side="right")))
    return out


def _percentiles(sample: np.ndarray, q: tuple[float, ...]) -> list[float]:
    """np.percentile(sample, q) (linear interpolation), exactly, without copying the sample."""
    n = sample.size
    virtual = np.true_divide(np.asanyarray(q, dtype=np.float64), 100) * (n - 1)
    below = np.floor(virtual).astype(np.int64)
    above = np.minimum(below + 1, n - 1)
    values = _order_statistics(_chunks(sample), sorted(set(below.tolist()) | set(above.tolist())))
    # np.quantile of the two neighbours at the same fraction runs NumPy's own interpolation
    return [
        float(np.quantile(np.array([values[int(b)], values[int(a)]], np.float32), v - b))
        for v, b, a in zip(virtual, below, above)
    ]


def scale_to_unit(volume: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(volume.shape, np.float32)
    return np.clip((volume - lo) / (hi - lo), 0, 1).astype(np.float32)


def _median_filter(unit: np.ndarray, window: int) -> np.ndarray:
    """In-plane median of one contiguous slice, on 8-bit levels: OpenCV's O(1) median is ~50x faster than SciPy's.

    OpenCV needs an odd window: an even one is rounded up (20 -> 21)."""
    u8 = np.round(unit * 255).astype(np.uint8)
    return cv2.medianBlur(u8, window | 1).astype(np.float32) / 255


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """scipy's binary_fill_holes with 4-connectivity, for one slice: background not 4-connected to the edge is
    filled."""
    count, labels = cv2.connectedComponents((~mask).view(np.uint8), connectivity=4)
    if count <= 1:
        return mask
    edge = np.zeros(count, bool)
    for side in (labels[0], labels[-1], labels[:, 0], labels[:, -1]):
        edge[side] = True
    edge[0] = True  # label 0 is the foreground itself
    return ~edge[labels] | mask


def _one_slice(raw: np.ndarray, lo: float, hi: float, otsu: float | None, roi: np.ndarray | None, window: int) -> tuple:
    """All metrics of one contiguous (X, Y) float32 slice: blurriness, PSNR-inv, CoV, mean, valid."""
    unit = scale_to_unit(raw, lo, hi)
    if roi is None:
        roi = fill_holes(unit > otsu)
    # blurriness: variance of the Laplacian of the slice min-max scaled to [0, 1] (mirror borders, as SciPy's)
    smin, smax = raw.min(), raw.max()
    span = smax - smin
    valid = bool(span > 0)
    lap = cv2.Laplacian((raw - smin) / (span if valid else 1), cv2.CV_32F, ksize=1, borderType=cv2.BORDER_REFLECT_101)
    blur = 1.0 / max(float(lap.var()), BLUR_FLOOR)
    # PSNR-inv: variance of the residual to the median-filtered slice over the slice's maximum
    peak = float(unit.max())
    psnr = float((unit - _median_filter(unit, window)).var()) / peak if peak > 0 else 0.0
    # ROI statistics
    inside = unit[roi]
    if inside.size == 0:
        return blur, psnr, 0.0, 0.0, valid
    mean = float(inside.sum(dtype=np.float64)) / inside.size
    std = float(np.sqrt(((inside - mean) ** 2).sum() / inside.size))
    return blur, psnr, (std / mean if mean > 0 else 0.0), mean, valid


def _workers() -> int:
    return max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8))


def slice_quality(volume: np.ndarray, roi_mask: np.ndarray | None = None, median_window: int = 20) -> SliceQuality:
    """Per-slice quality metrics of a (X, Y, Z) stack; `roi_mask` (same shape, > 0 inside) is optional.

    Slices are copied to contiguous memory a chunk at a time and measured in parallel threads (OpenCV and
    NumPy release the GIL), so memory stays bounded by the chunk, not the stack's depth."""
    if volume.ndim != 3:
        raise ValueError(f"need a (X, Y, Z) stack, got shape {volume.shape}")
    if roi_mask is not None and roi_mask.shape != volume.shape:
        raise ValueError(f"ROI mask shape {roi_mask.shape} differs from the stack's {volume.shape}")
    lo, hi = stack_range(volume)
    otsu = None if roi_mask is not None else _otsu(volume, lo, hi)
    rows = []
    with ThreadPoolExecutor(_workers()) as pool:
        for start in range(0, volume.shape[2], CHUNK):
            slab = np.ascontiguousarray(np.moveaxis(volume[:, :, start : start + CHUNK], 2, 0), dtype=np.float32)
            rois = (
                np.ascontiguousarray(np.moveaxis(roi_mask[:, :, start : start + CHUNK] > 0, 2, 0))
                if roi_mask is not None
                else [None] * len(slab)
            )
            rows += pool.map(lambda pair: _one_slice(pair[0], lo, hi, otsu, pair[1], median_window), zip(slab, rois))
    return _from_rows(rows, roi_mask is not None)


def _from_rows(rows: list[tuple], masked: bool) -> SliceQuality:
    blur, psnr, cov, mean, valid = (np.array(c) for c in zip(*rows)) if rows else (np.zeros(0),) * 5
    valid = valid.astype(bool)
    psnr = np.where(valid, psnr, 0.0)
    return SliceQuality(blur, psnr, cov, mean, valid, "mask" if masked else "auto")


def _otsu(volume: np.ndarray, lo: float, hi: float) -> float:
    """skimage's Otsu threshold (256 bins over the value range) of the scaled sub-sampled stack, chunk by chunk."""
    sample = volume[::2, ::2, :]
    scaled = lambda: (scale_to_unit(c, lo, hi) for c in _chunks(sample)())  # noqa: E731
    parts = [(c.min(), c.max()) for c in scaled() if c.size]
    if not parts:
        return 1.0
    vmin, vmax = min(p[0] for p in parts), max(p[1] for p in parts)
    if not vmax > vmin:
        return 1.0
    counts, edges = 0, None
    for c in scaled():
        h, edges = np.histogram(c, bins=256, range=(vmin, vmax))
        counts = counts + h
    return float(threshold_otsu(hist=(counts, (edges[:-1] + edges[1:]) / 2.0)))
