"""Next sample's pick variants (the setting `pick`): how a variant orders volumes before a model exists, which
slices it offers then, what it ranks once a model exists, and the order of the slices of the volume it opens;
qunet.policy keeps the ranking and applies the variant.

`paper` is QU-net++ as published: S0 volume by volume in id order, slices best first; with a model, the volume
holding the lowest open Q (Algorithm 1), its slices below q0 lowest first. `spread` aims at coverage, which the
literature finds hard to beat before a model is good (random and fixed-interval slices): the least annotated volume
first, and no two slices of one answer, nor a slice and an annotated one, closer than an even spacing allows.
`lesion` (the default) covers each volume's slice axis (`covering`, an eighth of its slices per answer), the least
annotated volume first (held slices count: a second annotator gets another volume; ties: the most lesion the current
model predicts in an open slice), with or without a model; within each stratum the slice where the model predicts
the most lesion (the level-4 output's pixels), else the best quality: a slice's error grows with the lesion the
model predicts in it, while its lowest-Q slices are mostly lesion-free ones it already gets right. `middles` is
`lesion` whose first answer from a volume is one slice, so that every volume's middle comes first; `interior` is
`lesion` with the stack's ends counted as taken, so that its end slices come last. How they compared:
docs/experiment-log.md.
"""

import math
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass, replace

import numpy as np

Slices = list[tuple[int, float]]  # (slice, score), best first: Q, or the S0 rank before a model exists


@dataclass(frozen=True)
class VolumeState:
    """What the records say about one volume."""

    image_id: str
    initial: Sequence[int] | None = None  # S0, best quality first; None: quality not computed yet
    q: Sequence[float | None] | None = None  # the current model's Q per slice (None where not scored; None: not yet)
    annotated: Set[int] = frozenset()
    # served to another client within the hold: not offered, counted against the budget (`choose` reads it; a
    # `Ranking` is given the holds with each question instead, as they change with the time and the client)
    held: Set[int] = frozenset()
    unscorable: bool = False  # the file cannot be scored (no Q will come)
    # optional: the slices with Q below the configured q0, lowest Q first (the app's scoring run stores them), so
    # that the ranking need not look at every slice; None: computed from q
    ranked: Sequence[int] | None = None
    # the current model's level-4 lesion pixels per slice (None where not scored); the `lesion` variant prefers them
    area: Sequence[float | None] | None = None
    depth: int | None = None  # slices in the stack (None: not known yet); variants that cover the slice axis need it
    constant: Set[int] = frozenset()  # slices without contrast (the quality record's `valid` false): never served


@dataclass(frozen=True)
class Variant:
    initial_key: Callable[[VolumeState], tuple]  # before a model: the smallest key opens first (ties: id order)
    order: Callable[
        [Slices, Set[int], int], Slices
    ]  # (open slices, annotated slices, limit): the first `limit` are served
    # covering variants serve any slice of the volume, spread over its axis (`covering`), with or without a model;
    # `prefer` (slice -> lower is better) decides within a stratum. Others serve S0, then the lowest Q below q0.
    prefer: Callable[[VolumeState], Mapping[int, float]] | None = None
    # covering: an answer serves at most this share of the volume's slices (rounded up), so that the next answer
    # moves on to the next least annotated volume and the cohort is covered before any volume is dense. A sixteenth
    # did not train better models than an eighth (docs/experiment-log.md)
    share: float = 1.0
    # covering: a volume's first answer is one slice (its middle stretch's best), so that, the least annotated volume
    # coming first, every volume's middle is asked for before a second slice of any
    first_alone: bool = False
    # covering: the stack's ends count as taken, so the slices spread over its interior (the middle, the quarters,
    # the eighths, ...) and the end slices, often outside the anatomy, come last
    ends_last: bool = False

    def answer_size(self, depth: int, taken: Set[int], limit: int) -> int:
        """Slices a covering answer serves from a volume of `depth` slices, `taken` of them annotated or held."""
        return 1 if self.first_alone and not taken else min(limit, math.ceil(depth * self.share))


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


def covering(
    depth: int,
    taken: Set[int],
    preferred: Mapping[int, float],
    limit: int,
    excluded: Set[int] = frozenset(),
    ends_last: bool = False,
) -> Slices:
    """Up to `limit` open slices spread over the slice axis: each the farthest from the taken ones and those chosen
    before it, so the first is the middle, then the ends, the quarters, and so on. Within a stratum (the slices at
    least three quarters as far as the farthest) the most `preferred` wins (the lowest value: the S0 rank, or minus
    the lesion the model predicts), else the farthest (ties: the lower index). `excluded` slices (constant ones) are
    never chosen. With `ends_last`, the ends count as taken: the middle, the quarters, the eighths, ... (slice,
    distance) pairs."""
    near = np.array(sorted(taken), dtype=np.int64)
    chosen: Slices = []
    while len(chosen) < limit:
        anchors = near if near.size and not ends_last else np.append(near, [-1, depth])  # nothing taken: the middle
        distance = np.abs(np.arange(depth)[:, None] - anchors[None, :]).min(axis=1)  # 0 where taken
        distance[[k for k in excluded if k < depth]] = 0
        far = int(distance.max(initial=0))
        if far == 0:
            break
        stratum = np.flatnonzero(4 * distance >= 3 * far).tolist()
        best = min(stratum, key=lambda k: (preferred.get(k, math.inf), -distance[k], k))
        chosen.append((best, float(distance[best])))
        near = np.append(near, best)
    return chosen


def predicted_lesion(v: VolumeState) -> Mapping[int, float]:
    """The most lesion the current model predicts in a slice first; without any (or a model), S0's best quality."""
    return {k: -a for k, a in enumerate(v.area or ()) if a} or {k: rank for rank, k in enumerate(v.initial or ())}


def least_annotated_most_lesion(v: VolumeState) -> tuple:
    return len(v.annotated), -max((a for k, a in enumerate(v.area or ()) if a and k not in v.annotated), default=0)


LESION = Variant(initial_key=least_annotated_most_lesion, order=best_first, prefer=predicted_lesion, share=1 / 8)
VARIANTS: dict[str, Variant] = {
    "paper": Variant(initial_key=lambda v: (), order=best_first),
    "spread": Variant(initial_key=lambda v: (len(v.annotated),), order=spaced),
    "lesion": LESION,
    "middles": replace(LESION, first_alone=True),
    "interior": replace(LESION, ends_last=True),
}
