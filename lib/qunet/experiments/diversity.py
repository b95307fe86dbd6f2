"""`appearance`: fixed-interval slices' allocation with the slice axis replaced by the slices' appearance.

Each stack gets its share of a round in proportion to its depth, as `interval`; within a stack, each new slice is
the open one whose thumbnail (the slice normalised as the network sees it, shrunk to THUMB x THUMB pixels) lies
farthest from those of its annotated slices (greedy k-centre); the first, the one nearest the stack's mean
thumbnail. It tests whether covering the stack's look, rather than its axis, trains better models.
"""

from collections.abc import Callable
from typing import TYPE_CHECKING

import cv2
import numpy as np

from qunet.experiments.data import Case, proportional_shares
from qunet.slices import Intensity

if TYPE_CHECKING:
    from qunet.experiments.activelearning import LoopRun

THUMB = 16


def thumbnails(volume: np.ndarray) -> np.ndarray:
    """(Z, THUMB * THUMB) float32: every slice normalised and shrunk by area averaging."""
    intensity = Intensity.of(volume)
    return np.stack([cv2.resize(intensity.apply(volume[:, :, k]), (THUMB, THUMB), interpolation=cv2.INTER_AREA).ravel()
                     for k in range(volume.shape[2])])


def appearance_picker(cases: list[Case]) -> Callable[["LoopRun", int, np.random.Generator], tuple[list[tuple[str, int]], int]]:
    features = {c.name: thumbnails(c.volume) for c in cases}

    def pick(run: "LoopRun", n: int, rng: np.random.Generator) -> tuple[list[tuple[str, int]], int]:
        chosen = []
        for case, share in zip(run.cases, proportional_shares(n, [c.depth for c in run.cases])):
            f = features[case.name]
            taken = sorted(run.annotated[case.name])
            for _ in range(min(share, case.depth - len(taken))):
                if taken:
                    distance = np.linalg.norm(f[:, None, :] - f[None, taken, :], axis=2).min(axis=1)
                else:
                    distance = -np.linalg.norm(f - f.mean(axis=0), axis=1)
                distance[taken] = -np.inf
                best = int(np.argmax(distance))
                taken.append(best)
                chosen.append((case.name, best))
        return chosen, 0

    return pick
