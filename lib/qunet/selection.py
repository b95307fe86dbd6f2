"""Choosing slices: the model-free initial set S0 (paper II-B) and Algorithm 1's disagreement pick (II-C)."""

from collections.abc import Iterable

import numpy as np

from qunet.config import QualityConfig
from qunet.quality import SliceQuality


def _cutoff(values: np.ndarray, percentile: float | None) -> float:
    return float(values.mean() if percentile is None else np.percentile(values, percentile))


def _ranks(values: np.ndarray) -> np.ndarray:
    """Rank of each value (0 = smallest; ties share the lower rank): scale-free, unlike the heavy-tailed values."""
    return np.searchsorted(np.sort(values), values, side="left").astype(float)


def _normalise(values: np.ndarray) -> np.ndarray:
    span = values.max() - values.min()
    return (values - values.min()) / span if span > 0 else np.zeros_like(values, dtype=float)


def select_initial(quality: SliceQuality, settings: QualityConfig = QualityConfig()) -> list[int]:
    """S0: sharp, high-contrast slices with distinct ROI statistics, best first (`settings`: its S0 fields).

    A valid slice is a candidate when its blurriness and PSNR-inv are both at or below the stack's cut-off
    (the mean over valid slices, geometric for blurriness; or the given percentile). Candidates are ranked by
    the sum of their ranks in blurriness and in PSNR-inv among the stack's valid slices (ties by index) and
    taken greedily; one within `epsilon0` (Euclidean, in (CoV, mean) space min-max normalised over the stack's
    valid slices) of an already kept slice is dropped; at most `max_initial` are kept.

    The two metrics pull apart on noisy stacks (noise raises the Laplacian's variance, so a noisy slice looks
    sharp, and PSNR-inv, so it looks low-contrast): both cut-offs together can leave one or two slices, too few
    to train on. Then S0 is filled up to `min_initial` (the paper's code: "select 5-10 images") with the next
    valid slices in the same ranking, under the same near-duplicate rule.
    """
    epsilon0, max_initial = settings.epsilon0, settings.max_initial
    valid = np.flatnonzero(quality.valid)
    if valid.size == 0 or max_initial <= 0:
        return []
    blur, psnr = quality.blurriness[valid], quality.psnr_inv[valid]
    # Blurriness, an inverse variance, spans orders of magnitude: a few very blurry slices would pull its plain
    # mean above nearly every slice, so its mean is taken on the log scale (the geometric mean).
    log_blur = np.log(blur)
    keep = (log_blur <= _cutoff(log_blur, settings.blur_percentile)) & (psnr <= _cutoff(psnr, settings.psnr_percentile))
    features = np.stack([_normalise(quality.cov[valid]), _normalise(quality.mean[valid])], axis=1)
    badness = _ranks(blur) + _ranks(psnr)
    chosen: list[int] = []

    def take(candidates: np.ndarray, limit: int) -> None:
        for i in sorted(candidates, key=lambda i: (badness[i], valid[i])):
            if len(chosen) >= limit:
                return
            if all(np.linalg.norm(features[i] - features[j]) > epsilon0 for j in chosen):
                chosen.append(i)

    take(np.flatnonzero(keep), max_initial)
    take(np.flatnonzero(~keep), min(settings.min_initial, max_initial))
    return [int(valid[i]) for i in chosen]


def select_by_disagreement(
    q: np.ndarray, q0: float = 0.5, exclude: Iterable[int] = (), limit: int | None = None
) -> list[int]:
    """Algorithm 1: slices whose Q = J(L3, L4) is below q0, lowest Q first, skipping `exclude`."""
    q = np.asarray(q, dtype=float)
    excluded = set(int(i) for i in exclude)
    flagged = [int(i) for i in np.argsort(q, kind="stable") if q[i] < q0 and int(i) not in excluded]
    return flagged if limit is None else flagged[:limit]
