"""`appearance`: fixed-interval slices' allocation with the slice axis replaced by the slices' appearance.

Each stack gets its share of a round in proportion to its depth, as `interval`; within a stack, each new slice is
the open one whose thumbnail (the slice normalised as the network sees it, shrunk to THUMB x THUMB pixels) lies
farthest from those of its annotated slices (greedy k-centre); the first, the one nearest the stack's mean
thumbnail. It tests whether covering the stack's look, rather than its axis, trains better models.
"""

from collections.abc import Callable, Mapping, Sequence, Set
from typing import Protocol

import cv2
import numpy as np

from qunet.slices import Intensity

from qunet_bench.data import Case, per_stack_picks


class Annotating(Protocol):
    """What a pick reads of a benchmark run (qunet_bench.activelearning.LoopRun)."""

    cases: Sequence[Case]
    annotated: Mapping[str, Set[int]]


THUMB = 16


def thumbnails(volume: np.ndarray) -> np.ndarray:
    """(Z, THUMB * THUMB) float32: every slice normalised and shrunk by area averaging."""
    intensity = Intensity.of(volume)
    return np.stack(
        [
            cv2.resize(intensity.apply(volume[:, :, k]), (THUMB, THUMB), interpolation=cv2.INTER_AREA).ravel()
            for k in range(volume.shape[2])
        ]
    )


def appearance_picker(
    cases: list[Case],
) -> Callable[[Annotating, int, np.random.Generator], tuple[list[tuple[str, int]], int]]:
    features = {c.name: thumbnails(c.volume) for c in cases}

    def farthest_look(case: Case, taken: list[int]) -> int:
        f = features[case.name]
        if taken:
            distance = np.linalg.norm(f[:, None, :] - f[None, taken, :], axis=2).min(axis=1)
        else:
            distance = -np.linalg.norm(f - f.mean(axis=0), axis=1)
        distance[taken] = -np.inf
        return int(np.argmax(distance))

    def pick(run: Annotating, n: int, rng: np.random.Generator) -> tuple[list[tuple[str, int]], int]:
        return per_stack_picks(run.cases, run.annotated, n, farthest_look), 0

    return pick
