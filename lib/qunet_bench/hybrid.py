"""Hybrid cohort: synthetic lesions with known masks inserted into real scans (docs/cohorts.md).

Each inserted lesion is an ellipsoid-like 3D blob with a smooth irregular border over a few consecutive slices
(qunet_bench.cohorts.plan_spans). It goes into the organ of the scan's own lesion (regions of tissue as bright as the
tissue around that lesion, e.g. the brain or the lungs; for a scan without a lesion, the body: voxels above the
air level), where the tissue under it is homogeneous, away from any other lesion. Inside it the smooth anatomy
is replaced by the local tissue level plus a step of 30-100 % of the own lesion's contrast against its
surroundings (hyper- or hypo-intense, at least 3 local noise std); the scan's own fine-scale noise stays, and
the edge is soft. Voxels outside the inserted masks keep their values; the hybrid's mask is the scan's own mask
OR the inserted ones. Arrays follow qunet.io's convention: (X, Y, Z), slice k is [:, :, k].
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from qunet.io import IMAGE_SUFFIXES, stack_id
from qunet.quality import fill_holes, stack_range

from qunet_bench.cohorts import blob_profile, log_uniform, plan_spans, summarize
from qunet_bench.synthetic import smooth_noise

AIR = 0.1  # body = brighter than this fraction of the scan's robust range (0.5th-99.5th percentile)
RADIUS_MM = (2.5, 10.0)  # in-plane radius at the widest slice, drawn log-uniformly
MIN_RADIUS_PX = 2.0
MARGIN_PX = 3  # ring around a lesion: kept in the body, clear of other lesions, and where the tissue is measured
EDGE_PX = 1.5  # soft edge, inside the mask
STEP = (0.3, 1.0)  # contrast step as a fraction of the scan's own lesion's contrast against its surroundings
REFERENCE_OF_RANGE = 0.2  # that contrast, as a fraction of the robust range, for a scan without a lesion
MIN_CNR = 3.0  # the step is at least this many local noise std
ORGAN_SHARE = 0.25  # organ: regions this large against the own lesion's region; slices with this much of the most
HOMOGENEOUS = 0.15  # max 5-95th percentile spread of the smoothed tissue under a lesion, as a fraction of the range
INSERTED = (1, 3)  # inserted lesions per hybrid, inclusive
SUFFIX_OUT = {".nhdr": ".nrrd", ".mhd": ".mha"}  # single-file formats for the copies


@dataclass
class Hybrid:
    image: np.ndarray  # (X, Y, Z) in the source's dtype
    mask: np.ndarray  # uint8 0/1: the source's lesions OR the inserted ones
    inserted: np.ndarray  # bool: voxels of the inserted lesions, the only voxels whose values changed
    lesions: int  # inserted lesions


@dataclass
class _Scan:
    """What placing and shading a lesion needs to know about a scan."""

    work: np.ndarray  # float32 copy of the image
    smooth: np.ndarray  # in-plane smoothed: the anatomy without the fine noise
    organ: np.ndarray  # bool: where lesions may go
    tissue: tuple[float, float]  # smoothed level a lesion's tissue must have
    reference: float  # contrast of a typical lesion in this scan
    lo: float  # robust intensity range
    hi: float


def insert_lesions(image: np.ndarray, mask: np.ndarray, spacing: Sequence[float], seed: int) -> Hybrid:
    """A copy of `image` (X, Y, Z) with 1-3 synthetic lesions, deterministic in `seed`; `mask` is its own label."""
    rng = np.random.default_rng(seed)
    own = mask > 0
    scan = _survey(image, own)
    inserted, count = np.zeros(image.shape, bool), 0
    out = scan.work.copy()
    area = scan.organ.sum(axis=(0, 1))
    spans = plan_spans(
        rng,
        image.shape[2],
        int(rng.integers(INSERTED[0], INSERTED[1] + 1)),
        own.any(axis=(0, 1)),
        area >= ORGAN_SHARE * area.max(),
        min_new=2,
    )
    for start, length in spans:
        radius = min(log_uniform(rng, *RADIUS_MM) / float(np.mean(spacing[:2])), min(image.shape[:2]) / 8)
        free = scan.organ & ~_near(own | inserted)
        while True:  # smaller when it fits nowhere, down to MIN_RADIUS_PX
            blob = _blob(rng, max(radius, MIN_RADIUS_PX), length)
            spot = _place(rng, blob, start, free, scan)
            if spot is not None:
                _shade(rng, out, blob, spot, start, scan)
                inserted[_box(blob, spot, start)] |= blob > 0
                count += 1
            if spot is not None or radius <= MIN_RADIUS_PX:
                break
            radius *= 0.7
    result = image.copy()
    values = out[inserted]
    if np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(image.dtype)
        values = np.clip(np.round(values), info.min, info.max)
    result[inserted] = values.astype(image.dtype)
    return Hybrid(result, (own | inserted).astype(np.uint8), inserted, count)


def _survey(image: np.ndarray, own: np.ndarray) -> _Scan:
    work = image.astype(np.float32)
    lo, hi = stack_range(work)
    smooth = ndimage.gaussian_filter(work, (1.5, 1.5, 0))
    body = np.stack([fill_holes(work[:, :, k] > lo + AIR * (hi - lo)) for k in range(work.shape[2])], axis=2)
    ring = _grow(own, 2 * MARGIN_PX) & ~_grow(own, MARGIN_PX) & body
    if not ring.any():
        return _Scan(work, smooth, body, (lo, hi), REFERENCE_OF_RANGE * (hi - lo), lo, hi)
    # lesions go into the organ around the scan's own lesion, with a contrast like its own
    tissue = tuple(float(t) for t in np.percentile(smooth[ring], (10, 90)))
    reference = abs(float(np.median(work[own]) - np.median(work[ring])))
    return _Scan(work, smooth, _organ(smooth, body, ring, tissue), tissue, reference, lo, hi)


def _box(blob: np.ndarray, spot: tuple[int, int], start: int) -> tuple[slice, slice, slice]:
    half = blob.shape[0] // 2
    return (
        slice(spot[0] - half, spot[0] + half + 1),
        slice(spot[1] - half, spot[1] + half + 1),
        slice(start, start + blob.shape[2]),
    )


def _shade(
    rng: np.random.Generator, out: np.ndarray, blob: np.ndarray, spot: tuple[int, int], start: int, scan: _Scan
) -> None:
    """Blend the lesion into `out`: its smooth anatomy replaced by the local level plus a contrast step."""
    box = _box(blob, spot, start)
    inside = blob > 0
    around = _grow(inside, MARGIN_PX) & ~inside
    level = float(np.median(scan.smooth[box][around]))
    step = max(rng.uniform(*STEP) * scan.reference, MIN_CNR * _noise_std(scan.work[box], around | inside))
    step *= rng.choice([-1.0, 1.0])
    if not scan.lo <= level + step <= scan.hi:  # out of the scan's range it would look saturated: other way
        step = -step
    half = blob.shape[0] // 2
    heterogeneity = smooth_noise(rng, blob.shape, (half / 3, half / 3, 0.7))
    out[box] += blob * (level + step * (1 + 0.1 * heterogeneity) - scan.smooth[box])


def _grow(mask: np.ndarray, px: int) -> np.ndarray:
    """In-plane dilation by a disc of `px` pixels, slice by slice."""
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * px + 1, 2 * px + 1))
    return np.stack([cv2.dilate(mask[:, :, k].astype(np.uint8), disc) for k in range(mask.shape[2])], axis=2) > 0


def _organ(smooth: np.ndarray, body: np.ndarray, ring: np.ndarray, tissue: tuple[float, float]) -> np.ndarray:
    """The organ of the scan's own lesion: 3D regions of tissue as bright as its surroundings (opened in-plane,
    so thin bridges do not join organs) that touch them or are at least ORGAN_SHARE of the largest that does,
    holes (vessels, ventricles) filled slice by slice. The brain, not the face; both lungs, not the chest wall."""
    like = (smooth >= tissue[0]) & (smooth <= tissue[1]) & body
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    like = (
        np.stack(
            [cv2.morphologyEx(like[:, :, k].view(np.uint8), cv2.MORPH_OPEN, disc) for k in range(like.shape[2])], axis=2
        )
        > 0
    )
    regions, _ = ndimage.label(like)
    sizes = np.bincount(regions.ravel())
    sizes[0] = 0
    touched = np.unique(regions[ring & like])
    touched = touched[touched > 0]
    if not touched.size:
        return body
    keep = np.union1d(touched, np.flatnonzero(sizes >= ORGAN_SHARE * sizes[touched].max()))
    organ = np.isin(regions, keep)
    return np.stack([fill_holes(organ[:, :, k]) for k in range(organ.shape[2])], axis=2)


def _near(mask: np.ndarray) -> np.ndarray:
    """Within MARGIN_PX in-plane of `mask`, in its slices and the adjacent ones, so lesions stay distinct in 3D."""
    grown = _grow(mask, MARGIN_PX)
    near = grown.copy()
    near[:, :, 1:] |= grown[:, :, :-1]
    near[:, :, :-1] |= grown[:, :, 1:]
    return near


def _blob(rng: np.random.Generator, radius: float, length: int) -> np.ndarray:
    """Soft-edged weights (0..1) of an irregular ellipsoid-like blob over `length` slices, centred in a box
    with room for its ring; the blob's mask is weights > 0 and holds the centre pixel in every slice."""
    half = int(np.ceil(1.2 * 1.3 * radius)) + MARGIN_PX + 1  # size jitter 1.2, border bulge 1.3
    d = np.arange(-half, half + 1, dtype=np.float32)
    theta, aspect = rng.uniform(0, np.pi), rng.uniform(0.6, 1.0)
    du, dv = d[:, None, None], d[None, :, None]
    a, b = du * np.cos(theta) + dv * np.sin(theta), (dv * np.cos(theta) - du * np.sin(theta)) / aspect
    size = blob_profile(rng, length, 0, length)
    r = np.sqrt(a**2 + b**2) / (radius * size)
    border = 1 + 0.15 * np.clip(smooth_noise(rng, r.shape, (radius / 2, radius / 2, 0.7)), -2, 2)
    return np.clip((border - r) * radius * size / EDGE_PX, 0, 1).astype(np.float32)


def _place(
    rng: np.random.Generator, blob: np.ndarray, start: int, free: np.ndarray, scan: _Scan, tries: int = 40
) -> tuple[int, int] | None:
    """Centre pixel where the blob and its ring lie in `free` in all its slices, over homogeneous tissue at the
    scan's tissue level; None if none of `tries` random candidates qualifies."""
    half, length = blob.shape[0] // 2, blob.shape[2]
    foot = _grow(blob > 0, MARGIN_PX).any(axis=2)
    foot = (foot | foot[::-1, ::-1]).astype(np.uint8)  # symmetric, so erosion needs no reflection
    room = free[:, :, start : start + length].all(axis=2).astype(np.uint8)
    ok = cv2.erode(room, foot, borderType=cv2.BORDER_CONSTANT, borderValue=0) > 0
    centre = scan.smooth[:, :, start + length // 2]
    ok &= (centre >= scan.tissue[0]) & (centre <= scan.tissue[1])
    ok[:half], ok[-half:], ok[:, :half], ok[:, -half:] = False, False, False, False
    candidates = np.argwhere(ok)
    for k in rng.permutation(len(candidates))[:tries]:
        i, j = candidates[k]
        under = scan.smooth[_box(blob, (i, j), start)][blob > 0]
        p5, p50, p95 = np.percentile(under, (5, 50, 95))
        if p95 - p5 <= HOMOGENEOUS * (scan.hi - scan.lo) and scan.tissue[0] <= p50 <= scan.tissue[1]:
            return int(i), int(j)
    return None


def _noise_std(values: np.ndarray, region: np.ndarray) -> float:
    """Noise std from in-plane neighbour differences inside `region` (median absolute deviation, robust to edges)."""
    diffs = [
        (np.diff(values, axis=ax) / np.sqrt(2))[region[1:] & region[:-1] if ax == 0 else region[:, 1:] & region[:, :-1]]
        for ax in (0, 1)
    ]
    d = np.concatenate(diffs)
    return float(1.4826 * np.median(np.abs(d - np.median(d)))) if d.size else 0.0


def labelled_stacks(folder: str | Path) -> list[tuple[Path, Path]]:
    """(image, mask) of every stack file in `folder` with a same-named mask in `folder`/ground-truth/."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder")
    return [
        (p, folder / "ground-truth" / p.name)
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name.endswith(IMAGE_SUFFIXES) and (folder / "ground-truth" / p.name).is_file()
    ]


def write_hybrids(
    source: str | Path, out_dir: str | Path, count: int, seed: int, stacks: Sequence[str] | None = None
) -> tuple[list[Path], list[str]]:
    """Write `count` hybrids of each labelled stack of `source` (or of those named in `stacks`) as
    `<name>-h<i>` in the source's format and geometry, masks in out_dir/ground-truth/; return paths, summaries."""
    pairs = labelled_stacks(source)
    if stacks:
        missing = set(stacks) - {stack_id(p) for p, _ in pairs}
        if missing:
            raise ValueError(f"no stack with a mask in {source} named {', '.join(sorted(missing))}")
        pairs = [(p, m) for p, m in pairs if stack_id(p) in stacks]
    if not pairs:
        raise ValueError(f"{source}: no stack has a same-named mask in ground-truth/")
    out_dir = Path(out_dir)
    (out_dir / "ground-truth").mkdir(parents=True, exist_ok=True)
    written, summary = [], []
    for image_path, mask_path in pairs:
        image, mask = sitk.ReadImage(str(image_path)), sitk.ReadImage(str(mask_path))
        _check_pair(image, mask, image_path)
        array, labels = sitk.GetArrayFromImage(image).T, sitk.GetArrayFromImage(mask).T  # (X, Y, Z)
        name = stack_id(image_path)
        suffix = image_path.name[len(name) :]
        for i in range(count):
            file_seed = int(np.random.SeedSequence([seed, zlib.crc32(name.encode()), i]).generate_state(1)[0])
            hybrid = insert_lesions(array, labels, image.GetSpacing(), file_seed)
            out_name = f"{name}-h{i + 1}{SUFFIX_OUT.get(suffix, suffix)}"
            _write(hybrid.image, image, out_dir / out_name)
            _write(hybrid.mask, image, out_dir / "ground-truth" / out_name)
            written.append(out_dir / out_name)
            summary.append(f"{summarize(out_name, hybrid.mask)}, {hybrid.lesions} inserted")
    return written, summary


def _check_pair(image: sitk.Image, mask: sitk.Image, path: Path) -> None:
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{path}: need a single-channel 3D stack")
    same = (
        image.GetSize() == mask.GetSize()
        and np.allclose(image.GetSpacing(), mask.GetSpacing(), atol=1e-3)
        and np.allclose(image.GetOrigin(), mask.GetOrigin(), atol=1e-3)
        and np.allclose(image.GetDirection(), mask.GetDirection(), atol=1e-3)
    )
    if not same:
        raise ValueError(f"{path}: its mask in ground-truth/ is not on the image's grid")


def _write(array: np.ndarray, like: sitk.Image, path: Path) -> None:
    """(X, Y, Z) array with the geometry (spacing, origin, direction) of `like`, compressed."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.T))
    image.CopyInformation(like)
    sitk.WriteImage(image, str(path), useCompression=True)
