"""Voxel-to-RAS affines from NRRD and MetaImage header fields, as MONAI's LoadImage gives them (its NrrdReader and
ITKReader), so a file decoded by qunet.safe_read has the geometry the app had always read for it."""

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _affine(columns: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """4x4 affine whose first three columns hold the spatial axes' steps (`columns`, 3 x N, N <= 3)."""
    affine = np.eye(4)
    affine[:3, : columns.shape[1]] = columns
    affine[:3, 3] = origin
    return affine


def nrrd_affine(header: dict) -> np.ndarray:
    """From 'space directions' (a row per axis; NaN rows for the non-spatial ones), 'space origin' and 'space';
    without directions, from 'spacings' (ITK's fallback). MONAI's NrrdReader turns LPS (or no 'space') into RAS and
    leaves every other space as it is."""
    directions = header.get("space directions")
    if directions is None:
        spacings = np.atleast_1d(np.asarray(header.get("spacings", np.ones(len(header["sizes"]))), dtype=float))
        steps = np.diag(spacings[np.isfinite(spacings)][:3])
        affine = _affine(steps, np.zeros(3))
        return LPS_TO_RAS @ affine
    rows = np.asarray(directions, dtype=float)
    rows = rows[~np.isnan(rows).all(axis=1)]
    if rows.shape[0] > 3 or rows.shape[1] != 3:
        raise ValueError(f"NRRD space directions of shape {rows.shape}: need at most three 3D directions")
    origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=float)
    if origin.shape != (3,):
        raise ValueError(f"NRRD space origin {origin.tolist()}: need three values")
    affine = _affine(rows.T, origin)
    space = str(header.get("space", "left-posterior-superior")).lower()
    return LPS_TO_RAS @ affine if space in ("left-posterior-superior", "lps") else affine


def meta_affine(fields: dict[str, str], ndims: int) -> np.ndarray:
    """From ElementSpacing, Offset (or Position, Origin) and TransformMatrix (or Rotation, Orientation; its rows are
    the axes' directions), in ITK's LPS, turned into RAS as MONAI's ITKReader does."""

    def numbers(keys: tuple[str, ...], default: list[float]) -> np.ndarray:
        value = next((fields[k] for k in keys if k in fields), None)
        return np.asarray([float(v) for v in value.split()] if value else default, dtype=float)

    spacing = numbers(("ElementSpacing", "ElementSize"), [1.0] * ndims)
    origin = numbers(("Offset", "Position", "Origin"), [0.0] * ndims)
    matrix = numbers(("TransformMatrix", "Rotation", "Orientation"), list(np.eye(ndims).ravel()))
    if spacing.size != ndims or origin.size != ndims or matrix.size != ndims * ndims or ndims > 3:
        raise ValueError(f"MetaImage geometry fields do not match NDims {ndims}")
    columns = np.zeros((3, ndims))
    columns[:ndims] = matrix.reshape(ndims, ndims).T * spacing
    full_origin = np.zeros(3)
    full_origin[:ndims] = origin
    return LPS_TO_RAS @ _affine(columns, full_origin)
