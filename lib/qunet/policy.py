"""Next sample's policy: which volume to open, which of its slices to annotate, and when to stop asking.

Plain data in, a pick out, no MONAI Label. `Ranking` keeps every volume's records (`VolumeState`) sorted for the
pick, so an answer looks at the few volumes it may serve: the app's strategy (apps/qunet/qunet_app/tasks/strategy.py)
keeps
one and updates the volumes whose records changed; `choose` builds one per answer (the benchmarks). Same code.

Phases (`paper` and `spread`; a covering variant such as the default `lesion` serves the first volume in its order
whatever the phase, which then says whether the current model has scored that volume):
- `initial`: no model yet: the model-free pick S0 (quality ranking), in the variant's volume order.
- `disagreement`: a model exists: slices whose Q = J(L3, L4) of the *current* model is below q0, from the volume
  holding the lowest open Q.
- `scoring`: a model exists but some volumes have no Q of it yet (re-scoring after training is under way). Volumes
  already re-scored are used (phase `disagreement`) as soon as one has a slice below q0; until then the answer
  says `scoring` and offers S0 slices still open, if any.

Stop signal (`Pick.stop`): qunet.stopping.

Budget: with `budget` > 0, q0 is lowered to the Q of the (R+1)-th lowest open slice when more than R = budget -
annotated - held slices lie below it, so at most R more slices are asked for; each answer holds at most R slices.
"""

import bisect
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field, replace
from typing import Any

from qunet.config import SelectionConfig
from qunet.stopping import Stop, stop_signal
from qunet.variants import VARIANTS, Slices, VolumeState, covering

INITIAL, DISAGREEMENT, SCORING = "initial", "disagreement", "scoring"


@dataclass(frozen=True)
class LoopState:
    has_model: bool = False
    agreement: Sequence[
        float | None
    ] = ()  # `agreement()` of each model's scores, oldest first, the current model's last


@dataclass(frozen=True)
class Option:
    volume: VolumeState
    slices: (
        Slices  # open (slice, score), best first: Q or S0 rank; covering variants: distance to the nearest taken slice
    )


@dataclass(frozen=True)
class Pick:
    phase: str
    image_id: str | None = None
    slices: list[int] = field(default_factory=list)
    # per slice: Q (disagreement) or S0 rank (initial); covering variants: distance to the nearest taken slice
    scores: list[float] = field(default_factory=list)
    q0: float = 0.5  # the q0 in force (the budget may lower it)
    below_q0: int = 0  # open slices below q0 in volumes scored by the current model: what is still to ask
    pending: int = 0  # volumes not scored by the current model yet
    remaining: int | None = None  # budget left (slices), None without a budget
    stop: Stop | None = None
    message: str = ""  # why there are no slices, when there are none


class Ranking:
    """Every volume's state, kept sorted for the pick: open slices below q0 by Q (then id, slice), volumes with open
    S0 slices in the variant's order, volumes without a quality record; and the counts the budget and the stop
    signal need. `put` and `discard` cost O(log n) searches plus list moves; `choose` looks at the head of the
    sorted lists, skipping only what is held."""

    def __init__(self, settings: SelectionConfig = SelectionConfig(), volumes: Iterable[VolumeState] = ()) -> None:
        self.settings = settings
        self.variant = VARIANTS[settings.pick]
        self._states: dict[str, VolumeState] = {}
        self._low: list[tuple[float, str, int]] = []  # (Q, id, slice): open slices with Q < settings.q0
        self._initial: list[tuple] = []  # (*variant key, id): volumes with an S0 slice not annotated
        self._no_quality: list[str] = []  # ids without a quality record that can be scored
        self._annotated = self._unscored = 0
        for v in {v.image_id: v for v in volumes}.values():
            self._add(v, list.append)  # sorted once below
        for items in (self._low, self._initial, self._no_quality):
            items.sort()

    def __len__(self) -> int:
        return len(self._states)

    @property
    def annotated_slices(self) -> int:
        return self._annotated

    def get(self, image_id: str) -> VolumeState | None:
        return self._states.get(image_id)

    def volumes(self) -> list[VolumeState]:
        return [self._states[i] for i in sorted(self._states)]

    def first_without_quality(self, skip: Set[str] = frozenset()) -> str | None:
        """The first volume (id order) that has no quality record yet and can be scored, other than `skip`."""
        return next((i for i in self._no_quality if i not in skip), None)

    def put(self, v: VolumeState) -> None:
        """Add a volume or replace its state."""
        self.discard(v.image_id)
        self._add(v, bisect.insort)

    def discard(self, image_id: str) -> None:
        v = self._states.pop(image_id, None)
        if v is None:
            return
        low, initial, no_quality = self._entries(v)
        for entry in low:
            self._remove(self._low, entry)
        if initial is not None:
            self._remove(self._initial, initial)
        if no_quality:
            self._remove(self._no_quality, image_id)
        self._annotated -= len(v.annotated)
        self._unscored -= v.q is None and not v.unscorable

    def _add(self, v: VolumeState, insert: Callable[[list, Any], None]) -> None:
        self._states[v.image_id] = v
        low, initial, no_quality = self._entries(v)
        for entry in low:
            insert(self._low, entry)
        if initial is not None:
            insert(self._initial, initial)
        if no_quality:
            insert(self._no_quality, v.image_id)
        self._annotated += len(v.annotated)
        self._unscored += v.q is None and not v.unscorable

    def _entries(self, v: VolumeState) -> tuple[list[tuple[float, str, int]], tuple | None, bool]:
        q0 = self.settings.q0
        low = []
        if v.q is not None:
            candidates = v.ranked if v.ranked is not None else range(len(v.q))
            low = [
                (v.q[k], v.image_id, k)
                for k in candidates
                if v.q[k] is not None and v.q[k] < q0 and k not in v.annotated
            ]
        if self._covers(v):
            opens = any(k not in v.annotated and k not in v.constant for k in range(v.depth))
        else:
            opens = v.initial is not None and any(k not in v.annotated for k in v.initial)
        initial = (*self.variant.initial_key(v), v.image_id) if opens else None
        return low, initial, v.initial is None and not v.unscorable

    def _covers(self, v: VolumeState) -> bool:
        """Whether the variant covers this volume's axis: it needs the depth, and a quality record or Q to go by."""
        return self.variant.prefer is not None and v.depth is not None and (v.initial is not None or v.q is not None)

    @staticmethod
    def _remove(items: list, entry) -> None:
        i = bisect.bisect_left(items, entry)
        if i < len(items) and items[i] == entry:
            del items[i]

    def choose(self, loop: LoopState, held: Mapping[str, Set[int]] = {}) -> Pick:
        """Next sample's answer (see the module docstring); `held`: image id -> slices held for other clients."""
        settings = self.settings
        held = {i: frozenset(h) for i, h in held.items() if h and i in self._states}
        remaining = None
        if settings.budget > 0:
            spent = self._annotated + sum(len(h - self._states[i].annotated) for i, h in held.items())
            remaining = max(0, settings.budget - spent)
        limit = settings.slices_per_sample if remaining is None else min(settings.slices_per_sample, remaining)
        pending = self._unscored if loop.has_model else 0
        q0 = settings.q0
        if loop.has_model and remaining is not None:
            q0 = self._budget_q0(held, remaining)
        below = bisect.bisect_left(self._low, (q0,)) if loop.has_model else 0  # held slices count: still to ask
        stop = stop_signal(loop.has_model, loop.agreement, settings, remaining, below, pending)
        common = {"q0": q0, "below_q0": below, "pending": pending, "remaining": remaining, "stop": stop}
        phase = DISAGREEMENT if loop.has_model else INITIAL
        if limit <= 0:
            return Pick(phase, message=stop.message if stop else "", **common)
        if not loop.has_model or self.variant.prefer is not None:  # covering: the model's records only steer the order
            chosen = self._first_initial(held, limit)
            if loop.has_model and chosen is not None and chosen.volume.q is None:  # not scored by the current model yet
                phase = SCORING if pending else INITIAL
        else:
            chosen = self._lowest_q(held, q0)
            if chosen is None and pending:
                phase, chosen = SCORING, self._first_initial(held, limit)
        if chosen is None:
            return Pick(phase, message=_nothing(phase, stop, pending), **common)
        slices = self.variant.order(chosen.slices, chosen.volume.annotated, limit)[:limit]
        return Pick(phase, chosen.volume.image_id, [k for k, _ in slices], [s for _, s in slices], **common)

    def _budget_q0(self, held: Mapping[str, frozenset[int]], remaining: int) -> float:
        """q0, lowered to the (remaining+1)-th lowest open Q not held when more than `remaining` lie below it."""
        count = 0
        for q, image_id, k in self._low:
            if k in held.get(image_id, ()):
                continue
            if count == remaining:
                return q
            count += 1
        return self.settings.q0

    def _lowest_q(self, held: Mapping[str, frozenset[int]], q0: float) -> Option | None:
        """The volume holding the lowest open Q below q0 not held (ties: id order), its such slices lowest first."""
        for q, image_id, k in self._low:
            if q >= q0:
                return None
            taken = held.get(image_id, frozenset())
            if k not in taken:
                low, _, _ = self._entries(self._states[image_id])
                return Option(
                    self._states[image_id], [(j, qj) for qj, _, j in sorted(low) if qj < q0 and j not in taken]
                )
        return None

    def _first_initial(self, held: Mapping[str, frozenset[int]], limit: int) -> Option | None:
        """The first volume in the variant's order with a slice to offer neither annotated nor held: its open S0
        slices, or with a covering variant up to `limit` slices spread over its slice axis. The order counts held
        slices as annotated (a second annotator moves on to the next volume); held volumes are few, so only they are
        keyed again."""
        candidates = []
        for entry in self._initial:
            if entry[-1] not in held and (option := self._open(self._states[entry[-1]], frozenset(), limit)):
                candidates.append((entry, option))
                break
        for image_id, taken in held.items():
            v = self._states[image_id]
            if option := self._open(v, taken, limit):
                candidates.append(
                    ((*self.variant.initial_key(replace(v, annotated=v.annotated | taken)), image_id), option)
                )
        return min(candidates, key=lambda c: c[0])[1] if candidates else None

    def _open(self, v: VolumeState, held: frozenset[int], limit: int) -> Option | None:
        taken = v.annotated | held
        if self._covers(v):
            size = self.variant.answer_size(v.depth, taken, limit)
            open_ = covering(v.depth, taken, self.variant.prefer(v), size, v.constant, self.variant.ends_last)
        else:
            open_ = [(k, float(rank)) for rank, k in enumerate(v.initial or ()) if k not in taken]
        return Option(v, open_) if open_ else None


def choose(volumes: Iterable[VolumeState], loop: LoopState, settings: SelectionConfig = SelectionConfig()) -> Pick:
    """Next sample's answer for the given records, holds included (`VolumeState.held`)."""
    volumes = list(volumes)
    return Ranking(settings, volumes).choose(loop, {v.image_id: v.held for v in volumes if v.held})


def rescore_order(volumes: Sequence[VolumeState]) -> list[str]:
    """The order to re-score volumes for a new model, those likely to be asked for next first, from the latest Q
    each has (an earlier model's): volumes with no Q at all first (nothing is known of them, and no model has been
    asked about them), then by their lowest open Q, ascending (ties by id)."""

    def key(v: VolumeState) -> tuple:
        if v.q is None:
            return (0, 0.0, v.image_id)
        return (
            1,
            min((q for k, q in enumerate(v.q) if q is not None and k not in v.annotated), default=2.0),
            v.image_id,
        )

    return [v.image_id for v in sorted(volumes, key=key)]


def _nothing(phase: str, stop: Stop | None, pending: int) -> str:
    if stop is not None:
        return stop.message
    if phase == SCORING:
        return f"the current model's disagreement scoring has {pending} volume(s) to go: ask again shortly"
    if phase == INITIAL:
        return "no S0 slice left (annotated, held or not scored yet): train a model to continue"
    return "every slice below q0 is held by another client: ask again later"
