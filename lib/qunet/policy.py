"""Next sample's policy: which volume to open, which of its slices to annotate, and when to stop asking.

Plain data in, a pick out, no MONAI Label: the app's strategy (apps/qunet/lib/strategies.py) reads the datastore
records into `VolumeState`s and calls `choose`; a benchmark calls it the same way with simulated records.

Phases:
- `initial`: no model yet: the model-free pick S0 (quality ranking), volume by volume.
- `disagreement`: a model exists: slices whose Q = J(L3, L4) of the *current* model is below q0.
- `scoring`: a model exists but some volumes have no Q of it yet (re-scoring after training is under way). Volumes
  already re-scored are used (phase `disagreement`) as soon as one has a slice below q0; until then the answer
  says `scoring` and offers S0 slices still open, if any.

Stop signal (`Pick.stop`): `budget_spent` (nothing left of `budget`), `no_slice_below_q0` (every volume is scored
by the current model and no unannotated slice is below q0) or `agreement_flattened` (the agreement statistic of
the current model differs from the previous model's by less than `stop_tolerance`: more labels stopped changing
how the model agrees with itself; slices are still offered).

Budget: with `budget` > 0, q0 is lowered to the Q of the (R+1)-th lowest open slice when more than R = budget -
annotated - held slices lie below it, so at most R more slices are asked for; each answer holds at most R slices.

Variants: a variant is one function `(options, phase, limit) -> option` choosing a volume among those with open
slices and ordering its slices (the first `limit` are served); `VARIANTS` names them and the setting `pick` selects
one. `paper` is QU-net++ as published. `spread` aims at coverage, which the literature finds hard to beat before
a model is good (random and fixed-interval slices): the least annotated volume first in the initial phase, and in
every phase no two slices of one answer, nor a slice and an annotated one, closer than an even spacing allows.
"""

import statistics
from collections.abc import Callable, Sequence, Set
from dataclasses import dataclass, field

from qunet.config import SelectionConfig

INITIAL, DISAGREEMENT, SCORING = "initial", "disagreement", "scoring"


@dataclass(frozen=True)
class VolumeState:
    """What the records say about one volume."""

    image_id: str
    initial: Sequence[int] | None = None  # S0, best quality first; None: quality not computed yet
    q: Sequence[float | None] | None = None  # the current model's Q per slice (None where not scored); None: not scored by it yet
    annotated: Set[int] = frozenset()
    held: Set[int] = frozenset()  # served to another client within the hold: not offered, counted against the budget
    unscorable: bool = False  # the file cannot be scored (no Q will come)
    # optional: the slices with Q below the configured q0, lowest Q first (the app's scoring run stores them), so
    # that choose need not look at every slice of every volume; None: computed from q
    ranked: Sequence[int] | None = None


@dataclass(frozen=True)
class LoopState:
    has_model: bool = False
    agreement: Sequence[float | None] = ()  # `agreement()` of each model's scores, oldest first, the current model's last


@dataclass(frozen=True)
class Option:
    volume: VolumeState
    slices: list[tuple[int, float]]  # open (slice, score), best first: Q, or S0 rank in the initial phase


@dataclass(frozen=True)
class Stop:
    reason: str  # budget_spent, no_slice_below_q0, agreement_flattened
    message: str


@dataclass(frozen=True)
class Pick:
    phase: str
    image_id: str | None = None
    slices: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)  # Q (disagreement) or S0 rank, per slice
    q0: float = 0.5  # the q0 in force (the budget may lower it)
    below_q0: int = 0  # open slices below q0 in volumes scored by the current model: what is still to ask
    pending: int = 0  # volumes not scored by the current model yet
    remaining: int | None = None  # budget left (slices), None without a budget
    stop: Stop | None = None
    message: str = ""  # why there are no slices, when there are none


Variant = Callable[[list[Option], str, int], Option]


def paper(options: list[Option], phase: str, limit: int) -> Option:
    """QU-net++ as published: S0 volume by volume (id order); then Algorithm 1: the volume holding the lowest Q."""
    if phase == DISAGREEMENT:
        return min(options, key=lambda o: o.slices[0][1])  # first in id order on ties
    return options[0]


def spaced(slices: list[tuple[int, float]], annotated: Set[int], limit: int) -> list[tuple[int, float]]:
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


def spread(options: list[Option], phase: str, limit: int) -> Option:
    """Coverage: the least annotated volume while no model exists (ties: id order), the paper's volume after; slices
    spaced along the stack (see `spaced`)."""
    if phase == DISAGREEMENT:
        chosen = paper(options, phase, limit)
    else:
        chosen = min(options, key=lambda o: len(o.volume.annotated))
    return Option(chosen.volume, spaced(chosen.slices, chosen.volume.annotated, limit))


VARIANTS: dict[str, Variant] = {"paper": paper, "spread": spread}


def agreement(q_values: Sequence[float]) -> float | None:
    """How well a model agrees with itself on open slices: the median Q over those where its levels 3 and 4 differ
    at all (Q < 1). Slices where both heads see nothing have Q = 1 and would pin a plain median at 1 on stacks where
    most slices hold no lesion. None when no slice disagrees."""
    disagreeing = [q for q in q_values if q < 1]
    return statistics.median(disagreeing) if disagreeing else None


def budget_q0(open_q: Sequence[float], q0: float, remaining: int | None) -> float:
    """q0, lowered to the (remaining+1)-th lowest open Q when more than `remaining` slices lie below q0 (ties may
    leave fewer below it)."""
    if remaining is None:
        return q0
    below = sorted(q for q in open_q if q < q0)
    return q0 if len(below) <= remaining else below[remaining]


def rescore_order(volumes: Sequence[VolumeState]) -> list[str]:
    """The order to re-score volumes for a new model, those likely to be asked for next first, from the latest Q
    each has (an earlier model's): volumes with no Q at all first (nothing is known of them, and no model has been
    asked about them), then by their lowest open Q, ascending (ties by id)."""
    def key(v: VolumeState) -> tuple:
        if v.q is None:
            return (0, 0.0, v.image_id)
        return (1, min((q for k, q in enumerate(v.q) if q is not None and k not in v.annotated), default=2.0), v.image_id)

    return [v.image_id for v in sorted(volumes, key=key)]


def _open_below(v: VolumeState, q0: float) -> list[tuple[int, float]]:
    """(slice, Q) of unannotated slices with Q below q0, lowest Q first."""
    if v.ranked is not None:
        return [(k, v.q[k]) for k in v.ranked if k not in v.annotated and v.q[k] < q0]
    found = [(k, q) for k, q in enumerate(v.q or ()) if q is not None and q < q0 and k not in v.annotated]
    return sorted(found, key=lambda s: s[1])


def _initial_options(volumes: Sequence[VolumeState]) -> list[Option]:
    options = []
    for v in volumes:
        open_ = [(k, float(rank)) for rank, k in enumerate(v.initial or ()) if k not in v.annotated and k not in v.held]
        if open_:
            options.append(Option(v, open_))
    return options


def _stop(loop: LoopState, settings: SelectionConfig, remaining: int | None, below: int, pending: int) -> Stop | None:
    if remaining == 0:
        return Stop("budget_spent", f"the budget of {settings.budget} slices is annotated or held")
    if not loop.has_model:
        return None
    if not pending and not below:
        return Stop("no_slice_below_q0", "no unannotated slice has Q below q0 for the current model")
    last = [a for a in loop.agreement[-2:] if a is not None]
    if settings.stop_tolerance > 0 and len(last) == 2 and abs(last[1] - last[0]) < settings.stop_tolerance:
        return Stop("agreement_flattened", f"the model's agreement changed by {abs(last[1] - last[0]):.3f} (< "
                                           f"{settings.stop_tolerance}) since the previous model")
    return None


def choose(volumes: Sequence[VolumeState], loop: LoopState, settings: SelectionConfig = SelectionConfig()) -> Pick:
    """Next sample's answer for the given records (see the module docstring)."""
    variant = VARIANTS[settings.pick]
    volumes = sorted(volumes, key=lambda v: v.image_id)
    remaining = None
    if settings.budget > 0:
        remaining = max(0, settings.budget - sum(len(v.annotated) + len(v.held - v.annotated) for v in volumes))
    limit = settings.slices_per_sample if remaining is None else min(settings.slices_per_sample, remaining)
    pending = sum(v.q is None and not v.unscorable for v in volumes) if loop.has_model else 0
    scored = {v.image_id: _open_below(v, settings.q0) for v in volumes if v.q is not None} if loop.has_model else {}
    q0 = settings.q0
    if remaining is not None:
        q0 = budget_q0([q for v in volumes for k, q in scored.get(v.image_id, ()) if k not in v.held], q0, remaining)
    below = sum(q < q0 for s in scored.values() for _, q in s)
    stop = _stop(loop, settings, remaining, below, pending)
    common = {"q0": q0, "below_q0": below, "pending": pending, "remaining": remaining, "stop": stop}
    if limit <= 0:
        return Pick(DISAGREEMENT if loop.has_model else INITIAL, message=stop.message if stop else "", **common)
    phase, options = INITIAL, []
    if loop.has_model:
        phase = DISAGREEMENT
        for v in volumes:
            open_ = [(k, q) for k, q in scored.get(v.image_id, ()) if q < q0 and k not in v.held]
            if open_:
                options.append(Option(v, open_))
        if not options and pending:
            phase, options = SCORING, _initial_options(volumes)
    else:
        options = _initial_options(volumes)
    if not options:
        return Pick(phase, message=_nothing(phase, stop, pending), **common)
    chosen = variant(options, phase, limit)
    slices = chosen.slices[:limit]
    return Pick(phase, chosen.volume.image_id, [k for k, _ in slices], [s for _, s in slices], **common)


def _nothing(phase: str, stop: Stop | None, pending: int) -> str:
    if stop is not None:
        return stop.message
    if phase == SCORING:
        return f"the current model's disagreement scoring has {pending} volume(s) to go: ask again shortly"
    if phase == INITIAL:
        return "no S0 slice left (annotated, held or not scored yet): train a model to continue"
    return "every slice below q0 is held by another client: ask again later"
