"""Next sample's pick variants (the setting `pick`): how a variant orders volumes before a model exists, and the
slices of the volume it opens. Once a model exists every variant opens the volume holding the lowest open Q
(Algorithm 1 of the paper); qunet.policy keeps the ranking and applies the variant.

`paper` is QU-net++ as published: S0 volume by volume in id order, slices best first. `spread` aims at coverage,
which the literature finds hard to beat before a model is good (random and fixed-interval slices): the least
annotated volume first, and no two slices of one answer, nor a slice and an annotated one, closer than an even
spacing allows.
"""

from collections.abc import Callable, Set
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qunet.policy import VolumeState

Slices = list[tuple[int, float]]  # (slice, score), best first: Q, or the S0 rank before a model exists


@dataclass(frozen=True)
class Variant:
    initial_key: Callable[["VolumeState"], tuple]  # before a model: the smallest key opens first (ties: id order)
    order: Callable[[Slices, Set[int], int], Slices]  # (open slices, annotated slices, limit): the first `limit` are served


def best_first(slices: Slices, annotated: Set[int], limit: int) -> Slices:
    return slices


def spaced(slices: Slices, annotated: Set[int], limit: int) -> Slices:
    """`slices` (best first) reordered so that the first `limit` keep a distance from each other and from the
    annotated slices: the span of candidate and annotated slices over limit + 1, at least 2 (no adjacent slices).
    Greedy in rank order; slices too close follow, in rank order, so an answer is never shorter than without."""
    taken = [k for k, _ in slices] + list(annotated)
    gap = max(2, (max(taken) - min(taken) + 1) // (limit + 1))
    chosen, rest, near = [], [], set(annotated)
    for k, score in slices:
        if len(chosen) < limit and all(abs(k - j) >= gap for j in near):
            chosen.append((k, score))
            near.add(k)
        else:
            rest.append((k, score))
    return chosen + rest


VARIANTS: dict[str, Variant] = {
    "paper": Variant(initial_key=lambda v: (), order=best_first),
    "spread": Variant(initial_key=lambda v: (len(v.annotated),), order=spaced),
}
