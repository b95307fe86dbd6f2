"""Multi-round active-learning benchmark of the app's own loop (`python -m qunet rounds`, qunet_bench.rounds_cli).

R rounds of what the app does, on stacks with full labels: pick slices, the simulated annotator draws their ground
truth, train (round 1 from the seed's initial weights, later rounds continuing from the previous round's, as the
app's trainer does), re-score, and measure voxel Dice on every slice not annotated yet. Every method annotates the
same number of slices each round (equal cost) and starts from the same weights for a seed:

- `lesion` (the app's default), `paper`, `spread`, `middles`, `interior`: the app's Next sample policy
(qunet.policy.choose, the very code
  the app's strategy calls) with each of its variants (qunet.variants.VARIANTS); asked repeatedly, as annotators
  would, until the round's slices are reached (slices it served are held: not served again, and counted in the
  volume order as the app counts submitted ones, so it moves on as after a submit); when it has nothing more
  to offer (`paper`, `spread`: no slice below q0) the rest of the round is random, and counted (`filled`);
- `random`: slices drawn at random from the whole cohort;
- `interval`: fixed-interval slices: each stack's share in proportion to its depth, each new slice the one
  farthest along the slice axis from those annotated in its stack;
- `appearance`: `interval`'s shares, each stack's slices by greedy k-centre over thumbnails (qunet_bench.diversity);
- `mcdropout`: MONAI Label-style epistemic active learning (a dropout network, 5 stochastic passes, mean entropy
  of the level-4 output), the most uncertain slices; its first round is random (MONAI Label's cold start);
- `lesion-random` (reference only, it reads the ground truth): random, one pick in three forced onto a lesion slice;
- `lesion+copy`, `lesion+model`: `lesion`'s picks, trained also on pseudo-labels of the annotated lesion slices'
  neighbours (qunet.neighbours: the annotation copied, or the previous round's model within the annotation's reach).
"""

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from qunet import policy
from qunet.config import ModelConfig, QualityConfig, SelectionConfig, TrainConfig
from qunet.disagreement import score_and_segment
from qunet.neighbours import neighbour_slices
from qunet.network import build_network, prepare
from qunet.policy import LoopState, VolumeState
from qunet.quality import slice_quality
from qunet.selection import select_initial
from qunet.slices import TrainingSlice
from qunet.training import seed_everything, train

from qunet_bench.data import Case, per_stack_picks, training_set
from qunet_bench.diversity import appearance_picker
from qunet_bench.uncertainty import mc_dropout_scores

METHODS = (
    "paper",
    "spread",
    "random",
    "interval",
    "mcdropout",
    "lesion-random",
    "lesion",
    "middles",
    "lesion+copy",
    "lesion+model",
    "interior",
    "appearance",
)  # appended: a method's index seeds its random draws
# `lesion`'s picks, trained also on pseudo-labels of the annotated lesion slices' neighbours (qunet.neighbours)
NEIGHBOUR_METHODS = {"lesion+copy": "copy", "lesion+model": "model"}


@dataclass(frozen=True)
class RoundsConfig:
    rounds: int = 4
    per_round: int = 12  # slices annotated each round, by every method
    seeds: int = 5
    methods: tuple[str, ...] = METHODS
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_epochs=4))  # one round's training
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    mc_passes: int = 5
    mc_dropout: float = 0.2


@dataclass
class RoundResult:
    method: str
    seed: int
    round: int
    annotated: int  # slices annotated so far, cohort-wide
    lesion_annotated: int  # of those, slices holding lesion
    filled: int  # slices of this round the method could not choose itself (random instead)
    dice: float  # voxel Dice on every slice not annotated yet, pooled over the cohort
    dice_lesion_slices: float
    seconds: float
    picked: list[tuple[str, int]] = field(default_factory=list)  # this round's slices, in the order chosen


@dataclass
class LoopRun:
    """One method's loop for one seed: what is annotated, the model, and its latest scores."""

    cases: list[Case]
    annotated: dict[str, set[int]]
    q: dict[str, np.ndarray]  # latest Q per slice (NaN where annotated or not scored)
    area: dict[str, np.ndarray] = field(default_factory=dict)  # latest predicted lesion pixels per slice (likewise)
    network: torch.nn.Module | None = None
    uncertainty: dict[str, np.ndarray] = field(default_factory=dict)

    def open_slices(self) -> list[tuple[str, int]]:
        return [(c.name, k) for c in self.cases for k in range(c.depth) if k not in self.annotated[c.name]]


Picker = Callable[[LoopRun, int, np.random.Generator], tuple[list[tuple[str, int]], int]]


def _random(run: LoopRun, n: int, rng: np.random.Generator, exclude: set = frozenset()) -> list[tuple[str, int]]:
    pool = [s for s in run.open_slices() if s not in exclude]
    return [pool[i] for i in rng.choice(len(pool), min(n, len(pool)), replace=False)]


def pick_random(run: LoopRun, n: int, rng: np.random.Generator) -> tuple[list[tuple[str, int]], int]:
    return _random(run, n, rng), 0


def pick_interval(run: LoopRun, n: int, rng: np.random.Generator) -> tuple[list[tuple[str, int]], int]:
    """Fixed-interval slices: stacks in proportion to depth; in each, the slice farthest from its annotated ones."""

    def farthest(case: Case, taken: list[int]) -> int:
        # before any slice: the middle; then the slice farthest from every taken one (lowest index on ties)
        return max(
            (k for k in range(case.depth) if k not in taken),
            key=lambda k: (min((abs(k - t) for t in taken), default=case.depth - abs(2 * k - case.depth)), -k),
        )

    return per_stack_picks(run.cases, run.annotated, n, farthest), 0


def pick_lesion_random(run: LoopRun, n: int, rng: np.random.Generator) -> tuple[list[tuple[str, int]], int]:
    lesion = [(c.name, k) for c in run.cases for k in c.lesion_slices if k not in run.annotated[c.name]]
    forced = [lesion[i] for i in rng.choice(len(lesion), min(n // 3, len(lesion)), replace=False)] if lesion else []
    return forced + _random(run, n - len(forced), rng, set(forced)), 0


def pick_mcdropout(run: LoopRun, n: int, rng: np.random.Generator) -> tuple[list[tuple[str, int]], int]:
    if not run.uncertainty:  # no model yet: MONAI Label's cold start is random
        return _random(run, n, rng), 0
    ranked = sorted(
        (
            (-float(u), name, k)
            for name, scores in run.uncertainty.items()
            for k, u in enumerate(scores)
            if u == u and k not in run.annotated[name]
        )
    )
    return [(name, k) for _, name, k in ranked[:n]], 0


def policy_picker(
    variant: str, initial: dict[str, list[int]], constant: dict[str, frozenset[int]], selection: SelectionConfig
) -> Picker:
    """The app's Next sample policy, asked repeatedly by one annotator until the round's slices are reached."""

    def pick(run: LoopRun, n: int, rng: np.random.Generator) -> tuple[list[tuple[str, int]], int]:
        chosen: list[tuple[str, int]] = []
        settings = replace(selection, pick=variant)
        loop = LoopState(has_model=run.network is not None)
        while len(chosen) < n:
            held = {c.name: {k for name, k in chosen if name == c.name} for c in run.cases}
            volumes = [
                VolumeState(
                    c.name,
                    initial[c.name],
                    _q_list(run.q.get(c.name)) if loop.has_model else None,
                    frozenset(run.annotated[c.name]),
                    frozenset(held[c.name]),
                    area=_q_list(run.area.get(c.name)) if loop.has_model else None,
                    depth=c.depth,
                    constant=constant[c.name],
                )
                for c in run.cases
            ]
            answer = policy.choose(volumes, loop, settings)
            if not answer.slices:
                break
            chosen += [(answer.image_id, k) for k in answer.slices[: n - len(chosen)]]
        filled = n - len(chosen)
        return chosen + _random(run, filled, rng, set(chosen)), filled

    return pick


def _q_list(q: np.ndarray | None) -> list[float | None] | None:
    return None if q is None else [None if v != v else float(v) for v in q]


class Benchmark:
    def __init__(self, cases: list[Case], config: RoundsConfig, device: torch.device) -> None:
        self.cases, self.config, self.device = cases, config, device
        quality = {c.name: slice_quality(c.volume, None, config.quality.median_window) for c in cases}
        self.initial = {name: select_initial(q, config.quality) for name, q in quality.items()}
        constant = {name: frozenset(np.flatnonzero(~q.valid).tolist()) for name, q in quality.items()}
        self.pickers: dict[str, Picker] = {
            **{
                variant: policy_picker(variant, self.initial, constant, config.selection) for variant in policy.VARIANTS
            },
            "random": pick_random,
            "interval": pick_interval,
            "mcdropout": pick_mcdropout,
            "lesion-random": pick_lesion_random,
            "appearance": appearance_picker(cases),
        }
        for method in NEIGHBOUR_METHODS:
            self.pickers[method] = self.pickers["lesion"]

    def loop(self, method: str, seed: int) -> Iterator[tuple[LoopRun, int, list[tuple[str, int]], int, float]]:
        """Each round of one method and seed, after its training: (the loop, round index, its picks, how many of them
        were filled at random, when the round began). The caller scores the model before asking for the next."""
        c = self.config
        run = LoopRun(self.cases, {case.name: set() for case in self.cases}, {})
        rng = np.random.default_rng([seed, METHODS.index(method)])
        seed_everything(seed)  # every method of a seed starts from the same weights (dropout adds no parameters)
        network = build_network(c.model.features, 1, c.mc_dropout if method == "mcdropout" else 0.0)
        for r in range(c.rounds):
            start = time.perf_counter()
            picks, filled = self.pickers[method](run, c.per_round, rng)
            for name, k in picks:
                run.annotated[name].add(k)
            train(
                network,
                self._training_set(run, NEIGHBOUR_METHODS.get(method, "off")),
                c.train,
                c.model.patch_size,
                seed=seed * 1000 + r,
                device=self.device,
            )
            run.network = prepare(network, self.device)
            yield run, r, picks, filled, start

    def _training_set(self, run: LoopRun, neighbours: str) -> list[TrainingSlice]:
        """The annotated slices, and the pseudo-labelled neighbours of the lesion slices among them (the previous
        round's model labels them in "model" mode)."""
        annotated = {n: sorted(v) for n, v in run.annotated.items()}
        return training_set(self.cases, annotated) + [
            s
            for c in self.cases
            for s in neighbour_slices(
                c.volume,
                c.truth.astype(np.uint8),
                annotated[c.name],
                1,
                c.name,
                neighbours,
                run.network,
                self.config.model.patch_size,
                self.device,
            )
        ]

    def run(
        self, method: str, seed: int, progress: Callable[[RoundResult], None] = lambda r: None
    ) -> list[RoundResult]:
        results = []
        for run, r, picks, filled, start in self.loop(method, seed):
            result = self._score(run, method, seed, r, filled, start)
            result.picked = picks
            results.append(result)
            progress(result)
        return results

    def _score(self, run: LoopRun, method: str, seed: int, r: int, filled: int, start: float) -> RoundResult:
        """Q and level-4 of every open slice in one pass (and MC-dropout scores for that method); Dice on them."""
        counts = np.zeros((2, 3), np.int64)
        for case in self.cases:
            todo = [k for k in range(case.depth) if k not in run.annotated[case.name]]
            q, found, area = score_and_segment(
                run.network, case.volume, self.config.model.patch_size, todo, self.device
            )
            run.q[case.name] = np.full(case.depth, np.nan)
            run.q[case.name][todo] = q
            run.area[case.name] = np.full(case.depth, np.nan)
            run.area[case.name][todo] = area
            truth = case.truth[:, :, todo]
            lesion = truth.any(axis=(0, 1))
            found = found > 0
            for row, (f, t) in enumerate(((found, truth), (found[:, :, lesion], truth[:, :, lesion]))):
                counts[row] += [(f & t).sum(), (f & ~t).sum(), (~f & t).sum()]
            if method == "mcdropout":
                scores = np.full(case.depth, np.nan)
                scores[todo] = mc_dropout_scores(
                    run.network,
                    case.volume,
                    todo,
                    self.config.mc_passes,
                    False,
                    self.config.model.patch_size,
                    self.device,
                    seed,
                )
                run.uncertainty[case.name] = scores
        dice = [2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0 for tp, fp, fn in counts]
        lesion_annotated = sum(
            int(c.truth[:, :, sorted(run.annotated[c.name])].any(axis=(0, 1)).sum()) for c in self.cases
        )
        return RoundResult(
            method,
            seed,
            r + 1,
            sum(map(len, run.annotated.values())),
            lesion_annotated,
            filled,
            round(dice[0], 4),
            round(dice[1], 4),
            round(time.perf_counter() - start, 1),
        )
