"""Cohorts for benchmarks that must tell slice-picking methods apart (docs/cohorts.md).

- `default`: qunet_bench.synthetic's stacks, every lesion in one slab of 35-55 % of the slices.
- `prevalence`: the same OCT-like and CT-like anatomy, degradations and noise, but 2-4 lesions per stack in
  5-30 % of its slices (drawn per stack), of varied size (from a few pixels across) and contrast (some faint).
- `hybrid`: synthetic lesions with known masks inserted into real scans (qunet_bench.hybrid).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from qunet_bench.synthetic import (
    SyntheticStack,
    check_request,
    ct_anatomy,
    finish,
    oct_anatomy,
    paint_cyst,
    paint_opacity,
    smooth_noise,
    speckle,
    taper,
)

COHORTS = ("default", "prevalence", "hybrid")
PREVALENCE = (0.05, 0.30)  # fraction of a stack's slices that hold a lesion
LESIONS = (2, 4)  # lesions per prevalence stack, inclusive


def plan_spans(
    rng: np.random.Generator,
    nz: int,
    count: int,
    taken: np.ndarray | None = None,
    allowed: np.ndarray | None = None,
    min_new: int = 0,
) -> list[tuple[int, int]]:
    """(first slice, length) of `count` lesions, so that together with the `taken` slices (lesions already
    there) they cover a fraction of the nz slices drawn from PREVALENCE, when the `allowed` slices permit,
    and at least `min_new` slices that were not taken.

    New lesions get runs of at least two slices, one slice apart so runs stay distinct; lesions beyond the
    number of runs share the slices of a run (new or taken), as neighbouring lesions do."""
    taken = np.zeros(nz, bool) if taken is None else taken.astype(bool)
    allowed = np.ones(nz, bool) if allowed is None else allowed.astype(bool)
    lo, hi = max(1, math.ceil(PREVALENCE[0] * nz)), max(1, math.floor(PREVALENCE[1] * nz))
    budget = max(int(np.clip(round(rng.uniform(*PREVALENCE) * nz), lo, hi)) - int(taken.sum()), min_new)
    if budget >= 2:
        runs = min(count, budget // 2)
        lengths = 2 + rng.multinomial(budget - 2 * runs, np.ones(runs) / runs)
    else:  # room for one single-slice lesion at most
        lengths = np.ones(int(budget == 1 and not taken.any()), int)
    used = np.zeros(nz, bool)
    spans = []
    for length in lengths:
        for n in range(int(length), 0, -1):  # shorter when no gap of this length is left
            free = [
                s
                for s in range(nz - n + 1)
                if allowed[s : s + n].all() and not taken[s : s + n].any() and not used[max(s - 1, 0) : s + n + 1].any()
            ]
            if free:
                start = int(rng.choice(free))
                used[start : start + n] = True
                spans.append((start, n))
                break
    hosts = spans + _runs(taken)
    for _ in range(count - len(spans)):
        if not hosts:
            break
        start, length = hosts[int(rng.integers(len(hosts)))]
        n = int(rng.integers(min(2, length), length + 1))
        spans.append((start + int(rng.integers(0, length - n + 1)), n))
    return spans


def _runs(present: np.ndarray) -> list[tuple[int, int]]:
    """(first slice, length) of each run of True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], present.astype(np.int8), [0]])))
    return [(int(a), int(b - a)) for a, b in zip(edges[::2], edges[1::2])]


def blob_profile(rng: np.random.Generator, nz: int, start: int, length: int) -> np.ndarray:
    """Per-slice size factor of a 3D blob: ellipsoid-like taper over its slices with a +-20 % jitter."""
    return taper(nz, start + (length - 1) / 2, length / 2) * rng.uniform(0.8, 1.2, nz)


def log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(max(high, low)))))


class _Placed:
    """Lesions placed so far: a new one is kept apart in-plane from those in the same or adjacent slices."""

    def __init__(self) -> None:
        self.items: list[tuple[int, int, float, float, float]] = []

    def clear(self, start: int, length: int, p: float, q: float, r: float) -> bool:
        return all(
            not (start <= e + 1 and s <= start + length) or math.hypot(p - op, q - oq) > r + orad + 2
            for s, e, op, oq, orad in self.items
        )

    def add(self, start: int, length: int, p: float, q: float, r: float) -> None:
        self.items.append((start, start + length - 1, p, q, r))


def prevalence_stack(kind: str, seed: int, shape: tuple[int, int, int] = (128, 128, 32)) -> SyntheticStack:
    """A degraded OCT-like or CT-like stack with 2-4 lesions in 5-30 % of its slices, deterministic in `seed`.

    Each lesion is centred on a pixel that it covers in every slice of its run, so the label holds exactly
    the planned slices."""
    shape = check_request(kind, shape)
    rng = np.random.default_rng(seed)
    spans = plan_spans(rng, shape[2], int(rng.integers(LESIONS[0], LESIONS[1] + 1)))
    image, label = (_oct_lesions if kind == "oct" else _ct_lesions)(rng, shape, spans)
    return finish(kind, image, label, rng)


def _oct_lesions(
    rng: np.random.Generator, shape: tuple[int, int, int], spans: list[tuple[int, int]]
) -> tuple[np.ndarray, np.ndarray]:
    nx, _, nz = shape
    a = oct_anatomy(rng, shape)
    label, placed = np.zeros(shape, bool), _Placed()
    for start, length in spans:
        # Radii in px: 1.5-2 px (a few pixels across) up to the default generator's largest; depth radius
        # >= 2 px keeps the nearest row to the centre inside even at the 0.28 smallest size factor.
        rx_px, rd_px = log_uniform(rng, 1.5, 0.1 * nx), log_uniform(rng, 2.0, 0.18 * a.thick)
        for _ in range(30):
            column, d0 = int(rng.integers(round(0.2 * nx), round(0.8 * nx))), rng.uniform(0.4, 0.6)
            if placed.clear(start, length, column, d0 * a.thick, max(rx_px, rd_px)):
                break
        placed.add(start, length, column, d0 * a.thick, max(rx_px, rd_px))
        paint_cyst(
            a,
            label,
            float(a.x[column, 0, 0]),
            d0,
            rx_px * 2 / (nx - 1),
            rd_px / a.thick,
            blob_profile(rng, nz, start, length),
            rng.uniform(0.3, 0.85),
        )  # some cysts faint
    return speckle(rng, a.clean), label.astype(np.uint8)


def _ct_lesions(
    rng: np.random.Generator, shape: tuple[int, int, int], spans: list[tuple[int, int]]
) -> tuple[np.ndarray, np.ndarray]:
    nx, ny, nz = shape
    a = ct_anatomy(rng, shape)
    label, placed = np.zeros(shape, bool), _Placed()
    texture = 1 + 0.3 * smooth_noise(rng, shape, (2.0, 2.0, 1.0))
    lung_px = min(a.lungs[0][2] * (nx - 1), a.lungs[0][3] * (ny - 1)) / 2  # smaller lung radius in px
    for start, length in spans:
        ru_px, rv_px = log_uniform(rng, 1.5, 0.5 * lung_px), log_uniform(rng, 1.5, 0.5 * lung_px)
        reach = 1.2 * 1.18 * max(ru_px, rv_px)  # labelled out to profile 0.5, size factor up to 1.2
        lung_run = a.lung[:, :, start : start + length].all(axis=2)
        inside = ndimage.binary_erosion(lung_run)
        candidates = np.argwhere(inside if inside.any() else lung_run)
        if not candidates.size:  # no pixel is lung in every slice of the run (tiny shapes): drop it
            continue
        for _ in range(30):
            i, j = candidates[int(rng.integers(len(candidates)))]
            if placed.clear(start, length, i, j, reach):
                break
        placed.add(start, length, i, j, reach)
        paint_opacity(
            a,
            label,
            texture,
            float(a.u[i, 0, 0]),
            float(a.v[0, j, 0]),
            ru_px * 2 / (nx - 1),
            rv_px * 2 / (ny - 1),
            blob_profile(rng, nz, start, length),
            log_uniform(rng, 80.0, 500.0),
        )
    return a.image, label.astype(np.uint8)


def summarize(name: str, mask: np.ndarray) -> str:
    """One line: lesion slices, voxel fraction and connected lesion regions of a (X, Y, Z) mask."""
    present = (mask > 0).any(axis=(0, 1))
    regions = ndimage.label(mask > 0)[1]
    return (
        f"{name}: lesions in {int(present.sum())}/{present.size} slices ({100 * present.mean():.0f} %), "
        f"{100 * float((mask > 0).mean()):.3f} % of voxels, {regions} connected regions"
    )
