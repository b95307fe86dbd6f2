"""Synthetic OCT and lung-CT stacks with known lesions and known per-slice degradations.

Stand-ins for the paper's OCT cyst and COVID-19 lung-CT ground-glass stacks (section II-A),
so the image-quality metrics (blurriness, PSNR-inv, near-duplicate removal) and the
U-net++ pipeline can be exercised without the real data. Arrays are (X, Y, Z): slice k is
image[:, :, k]; for OCT, X is lateral and Y is depth, so the layers run along X.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

KINDS = ("oct", "ct")
MIN_SHAPE = (32, 32, 4)
SPACING_MM = {"oct": (0.012, 0.004, 0.12), "ct": (0.7, 0.7, 5.0)}
# Nominal intensity span of each kind: the unit in which noise_std is expressed.
SPAN = {"oct": 1.0, "ct": 1100.0}
# Retina profile along depth (fraction of retinal thickness) -> reflectivity:
# bright RNFL, IPL, OPL, IS/OS and RPE bands alternating with darker nuclear layers.
_OCT_DEPTH = (-0.04, 0.0, 0.1, 0.14, 0.28, 0.33, 0.42, 0.47, 0.56, 0.61, 0.8, 0.84, 0.88, 0.92, 1.0, 1.1, 1.5)
_OCT_LEVEL = (0.05, 0.8, 0.75, 0.4, 0.4, 0.62, 0.62, 0.3, 0.3, 0.55, 0.25, 0.7, 0.45, 0.9, 0.9, 0.35, 0.05)


@dataclass
class SyntheticStack:
    image: np.ndarray  # float32 (X, Y, Z); OCT in 0..1, CT in HU
    label: np.ndarray  # uint8 0/1, same shape
    blur_sigma: np.ndarray  # (Z,) in-plane Gaussian sigma in px, 0 = sharp
    noise_std: np.ndarray  # (Z,) additive noise std as a fraction of SPAN[kind]
    contrast: np.ndarray  # (Z,) contrast factor about the slice mean, 1 = full
    duplicate_of: np.ndarray  # (Z,) index of the slice this one nearly copies, -1 if none


@dataclass
class OctAnatomy:
    clean: np.ndarray  # float32 (X, Y, Z) reflectivity before speckle
    x: np.ndarray  # lateral coordinate, -1..1, shape (X, 1, 1)
    depth: np.ndarray  # fraction of retinal thickness, 0 at the inner surface, 1 at the RPE
    thick: float  # retinal thickness in px


@dataclass
class CtAnatomy:
    image: np.ndarray  # float32 (X, Y, Z) in HU
    lung: np.ndarray  # bool, aerated lung
    lungs: list[tuple[float, float, float, float]]  # (centre u, centre v, radius u, radius v) of each lung
    u: np.ndarray  # in-plane coordinates, -1..1, shapes (X, 1, 1) and (1, Y, 1)
    v: np.ndarray


def generate_stack(kind: str, seed: int, shape: tuple[int, int, int] = (128, 128, 32)) -> SyntheticStack:
    """One degraded stack of `kind` with its lesion label, deterministic in `seed`."""
    shape = check_request(kind, shape)
    rng = np.random.default_rng(seed)
    image, label = (_oct if kind == "oct" else _ct)(rng, shape)
    return finish(kind, image, label, rng)


def check_request(kind: str, shape: Sequence[int]) -> tuple[int, int, int]:
    """Validated kind and shape, as ints."""
    _check_kind(kind)
    if len(shape) != 3 or any(s < m for s, m in zip(shape, MIN_SHAPE)):
        raise ValueError(f"shape must be 3D and at least {MIN_SHAPE}, got {tuple(shape)}")
    return tuple(int(s) for s in shape)


def finish(kind: str, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> SyntheticStack:
    """Degrade a clean stack (contrast loss, blur, noise, near-duplicates) into the stack the tools see."""
    stack = _degrade(image, label, rng, SPAN[kind])
    if kind == "oct":  # reflectivity is non-negative and the int16 export maps 0..1
        np.clip(stack.image, 0.0, 1.0, out=stack.image)
    return stack


def write_dataset(
    out_dir: str | Path,
    kinds: Sequence[str] = KINDS,
    count: int = 2,
    seed: int = 0,
    shape: tuple[int, int, int] = (128, 128, 32),
    make: Callable[[str, int, tuple[int, int, int]], SyntheticStack] = generate_stack,
    tag: str = "",
) -> list[Path]:
    """Write `<kind><tag><i>.nii.gz` images made by `make(kind, seed, shape)` and same-named labels in
    `ground-truth/`; return the image paths."""
    for kind in kinds:
        check_request(kind, shape)
    out_dir = Path(out_dir)
    (out_dir / "ground-truth").mkdir(parents=True, exist_ok=True)
    paths = []
    for kind in kinds:
        affine = np.diag([*SPACING_MM[kind], 1.0])
        for i in range(count):
            # Distinct, reproducible stream per file (and per tag), so datasets made with nearby seeds
            # or for different cohorts do not overlap.
            entropy = [seed, KINDS.index(kind), i, *map(ord, tag)]
            stack = make(kind, int(np.random.SeedSequence(entropy).generate_state(1)[0]), shape)
            scale = 1000.0 if kind == "oct" else 1.0
            name = f"{kind}{tag}{i + 1}.nii.gz"
            _save(np.round(stack.image * scale).astype(np.int16), affine, out_dir / name)
            _save(stack.label, affine, out_dir / "ground-truth" / name)
            paths.append(out_dir / name)
    return sorted(paths)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; allowed kinds: {', '.join(KINDS)}")


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    nib.save(img, path)


def _lesion_slabs(rng: np.random.Generator, z: int, n: int) -> list[tuple[float, float]]:
    """(centre, half-length) in slices for n lesions; the first spans the whole lesion slab.

    One contiguous slab of 35-55% of the slices holds every lesion, so the rest carry none.
    """
    length = int(np.clip(round(z * rng.uniform(0.35, 0.55)), 1, z - 1))
    start = int(rng.integers(0, z - length + 1))
    slabs = [(start + (length - 1) / 2, length / 2)]
    for _ in range(n - 1):
        sub = int(rng.integers(max(1, length // 3), length + 1))
        s0 = start + int(rng.integers(0, length - sub + 1))
        slabs.append((s0 + (sub - 1) / 2, sub / 2))
    return slabs


def taper(z: int, centre: float, half: float) -> np.ndarray:
    """In-plane size factor per slice: lesions grow then shrink like 3D blobs, 0 outside."""
    t = (np.arange(z) - centre) / half
    return np.where(np.abs(t) < 1, 0.35 + 0.65 * np.sqrt(np.clip(1 - t**2, 0, 1)), 0.0)


def _radius2(du: np.ndarray, dv: np.ndarray, ru: float, rv: float, size: np.ndarray) -> np.ndarray:
    """Squared normalised elliptical radius; infinite in slices where the lesion is absent."""
    with np.errstate(divide="ignore", invalid="ignore"):  # 0/0 at the centre of an absent slice
        r2 = ((du / ru) ** 2 + (dv / rv) ** 2) / size**2
    return np.where(size > 0, r2, np.inf)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: tuple[float, ...]) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return field / field.std()


def oct_anatomy(rng: np.random.Generator, shape: tuple[int, int, int]) -> OctAnatomy:
    """Lesion-free retina before speckle: layered reflectivity with a curvature that drifts across slices."""
    nx, ny, nz = shape
    x = np.linspace(-1, 1, nx, dtype=np.float32)[:, None, None]
    y = np.arange(ny, dtype=np.float32)[None, :, None]
    k = np.arange(nz)
    # Retina sagging in the middle like the posterior eye wall; curvature drifts across slices.
    curv = rng.uniform(0.06, 0.12) + rng.uniform(0.02, 0.05) * np.sin(
        2 * np.pi * rng.uniform(0.3, 1.0) * k / nz + rng.uniform(0, 2 * np.pi)
    )
    top = ny * (rng.uniform(0.12, 0.2) + rng.uniform(-0.04, 0.04) * x + curv * (1 - x**2))
    thick = ny * rng.uniform(0.32, 0.4)
    depth = (y - top) / thick  # 0 at the inner surface, 1 at the RPE
    return OctAnatomy(np.interp(depth, _OCT_DEPTH, _OCT_LEVEL).astype(np.float32), x, depth, thick)


def paint_cyst(
    a: OctAnatomy, label: np.ndarray, x0: float, d0: float, rx: float, rd: float, size: np.ndarray, darkness: float
) -> None:
    """Dark fluid blob with a soft rim centred at lateral x0, depth d0; radii in x and depth units."""
    r = np.sqrt(_radius2(a.x - x0, a.depth - d0, rx, rd, size))
    label |= r <= 1
    a.clean *= 1 - darkness * np.clip((1.15 - r) / 0.3, 0, 1)


def speckle(rng: np.random.Generator, clean: np.ndarray) -> np.ndarray:
    """Multiplicative speckle, gamma distributed with unit mean, slightly correlated in-plane."""
    field = ndimage.gaussian_filter(rng.gamma(3.0, 1 / 3.0, clean.shape).astype(np.float32), (0.6, 0.6, 0))
    return clean * field / field.mean()


def _oct(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    nx, _, nz = shape
    a = oct_anatomy(rng, shape)
    label = np.zeros(shape, dtype=bool)
    for centre, half in _lesion_slabs(rng, nz, int(rng.integers(1, 4))):
        # Cysts sit in the inner/outer nuclear layers; radii in px, at least ~3 px so the
        # smallest (tapered) cross-section still covers a pixel.
        rx = max(3.0, nx * rng.uniform(0.04, 0.1)) / (nx / 2)
        rd = max(3.0, a.thick * rng.uniform(0.1, 0.18)) / a.thick
        x0, d0 = rng.uniform(-0.6, 0.6), rng.uniform(0.4, 0.6)
        paint_cyst(a, label, x0, d0, rx, rd, taper(nz, centre, half), 0.85)
    return speckle(rng, a.clean), label.astype(np.uint8)


def ct_anatomy(rng: np.random.Generator, shape: tuple[int, int, int]) -> CtAnatomy:
    """Lesion-free chest in HU: body, mediastinum, spine and two lobulated lungs with vessels."""
    nx, ny, nz = shape
    u = np.linspace(-1, 1, nx, dtype=np.float32)[:, None, None]
    v = np.linspace(-1, 1, ny, dtype=np.float32)[None, :, None]
    k = np.arange(nz)
    ax, ay = rng.uniform(0.85, 0.95), rng.uniform(0.62, 0.72)
    body = (u / ax) ** 2 + (v / ay) ** 2
    img = np.where(body <= 1, -100.0, -1000.0).astype(np.float32)  # fat rim inside, air outside
    img[body <= 0.85] = 40.0  # muscle and mediastinum
    img[(u / 0.07) ** 2 + ((v - 0.72 * ay) / 0.08) ** 2 <= 1] = 300.0  # vertebral body

    grow = 0.8 + 0.2 * np.sin(np.pi * (k + 0.5) / nz)  # lungs widest mid-stack
    lungs = [
        (
            side * ax * rng.uniform(0.4, 0.46),
            rng.uniform(-0.08, 0.02),
            ax * rng.uniform(0.26, 0.3),
            ay * rng.uniform(0.6, 0.7),
        )
        for side in (-1, 1)
    ]
    # Lobulated outline: the ellipse radius is wobbled by a smooth field; the heart dents the lungs.
    wobble = 1 + 0.08 * smooth_noise(rng, shape, (6.0, 6.0, 2.0))
    lung = np.zeros(shape, dtype=bool)
    for cx, cy, rx, ry in lungs:
        lung |= _radius2(u - cx, v - cy, rx, ry, grow) <= wobble**2
    lung &= ((u - 0.12 * ax) / (0.3 * ax)) ** 2 + ((v + 0.35 * ay) / (0.4 * ay)) ** 2 > 1
    lung &= body < 0.7  # keep a chest wall between lung and outside air
    # Vessels: peaks of a smooth 3D random field are tubes running through the slices.
    vessels = 1 / (1 + np.exp(-(smooth_noise(rng, shape, (1.5, 1.5, 1.0)) - 1.6) / 0.1))
    parenchyma = -850.0 + 15 * smooth_noise(rng, shape, (1.5, 1.5, 0.5)) + 800 * vessels
    return CtAnatomy(np.where(lung, parenchyma, img), lung, lungs, u, v)


def paint_opacity(
    a: CtAnatomy,
    label: np.ndarray,
    texture: np.ndarray,
    cx: float,
    cy: float,
    ru: float,
    rv: float,
    size: np.ndarray,
    hu: float,
) -> None:
    """Ground-glass opacity: a textured Gaussian bump of `hu` at the core, confined to the lungs."""
    profile = np.exp(-_radius2(a.u - cx, a.v - cy, ru, rv, size) / 2)
    a.image += a.lung * hu * profile * texture
    label |= a.lung & (profile >= 0.5)  # where the opacity is clearly present


def _ct(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    nz = shape[2]
    a = ct_anatomy(rng, shape)
    label = np.zeros(shape, dtype=bool)
    texture = 1 + 0.3 * smooth_noise(rng, shape, (2.0, 2.0, 1.0))
    for centre, half in _lesion_slabs(rng, nz, int(rng.integers(1, 4))):
        cx, cy, rx, ry = a.lungs[int(rng.integers(2))]
        rx, ry = 0.8 * rx, 0.8 * ry  # smallest lung extent, so the core stays inside the lung
        cx, cy = cx + rng.uniform(-0.4, 0.4) * rx, cy + rng.uniform(-0.4, 0.4) * ry
        ru, rv = rng.uniform(0.3, 0.6) * rx, rng.uniform(0.2, 0.4) * ry
        paint_opacity(a, label, texture, cx, cy, ru, rv, taper(nz, centre, half), 270.0)  # -850 -> ~-580 HU
    return a.image, label.astype(np.uint8)


def _degrade(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, span: float) -> SyntheticStack:
    """Apply per-slice contrast loss, blur and noise, then plant near-duplicate slices."""
    nx, ny, nz = image.shape
    # Blur and contrast loss hit disjoint slices, so each metric has a clean defect to find
    # (noise added to a washed-out, blurred slice would mask its blur).
    order = rng.permutation(nz)
    n_blur = max(1, round(nz * rng.uniform(0.2, 0.3)))
    n_flat = max(1, round(nz * rng.uniform(0.1, 0.2)))
    blur = np.zeros(nz)
    blur[order[:n_blur]] = rng.uniform(1.5, 4.0, n_blur)
    contrast = np.ones(nz)
    contrast[order[n_blur : n_blur + n_flat]] = rng.uniform(0.3, 0.6, n_flat)
    noise = rng.uniform(0.005, 0.03, nz)

    mean = image.mean(axis=(0, 1))
    out = (mean + (image - mean) * contrast).astype(np.float32)
    for z in np.flatnonzero(blur):
        out[:, :, z] = ndimage.gaussian_filter(out[:, :, z], blur[z])
    out += rng.standard_normal(image.shape, dtype=np.float32) * (noise * span).astype(np.float32)

    dup = _pick_duplicates(rng, label.any(axis=(0, 1)), int(rng.integers(2, 4)) if nz >= 16 else 1)
    tiny = 0.002
    for z in np.flatnonzero(dup >= 0):
        src = dup[z]
        out[:, :, z] = out[:, :, src] + rng.standard_normal((nx, ny), dtype=np.float32) * np.float32(tiny * span)
        label[:, :, z] = label[:, :, src]
        blur[z], contrast[z], noise[z] = blur[src], contrast[src], np.hypot(noise[src], tiny)
    return SyntheticStack(out, label, blur, noise, contrast, dup)


def _pick_duplicates(rng: np.random.Generator, has_lesion: np.ndarray, n: int) -> np.ndarray:
    """Map up to n slices to a source 1-3 slices earlier with the same lesion presence.

    Keeping presence equal leaves the lesion slab contiguous and its size unchanged.
    """
    dup = np.full(has_lesion.size, -1)
    for z in rng.permutation(np.arange(1, has_lesion.size)):
        src = z - int(rng.integers(1, 4))
        # No chains: the source is not itself a copy, and z is nobody's source.
        if src >= 0 and dup[src] < 0 and z not in dup and has_lesion[src] == has_lesion[z]:
            dup[z] = src
            if (dup >= 0).sum() == n:
                break
    return dup
