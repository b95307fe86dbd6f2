"""Reproduce the paper's Table I on stacks with full labels, simulating the annotator.

    python -m qunet experiment --data FOLDER [--labels DIR] --out DIR [settings]   (qunet_bench.table1_cli)

Every stack in FOLDER needs a full ground-truth label (by default FOLDER/ground-truth/<same file name>). A
"selected" slice gets its ground-truth label, as if an annotator had drawn it; every model is trained with the
app's recipe (qunet.training) and evaluated on the slices it was *not* trained on. Slices of all stacks are
pooled into one training set (per-stack S0, per-stack 25 %); metrics are reported per stack and pooled.

Methods (each run once per seed; seeds change the network's initialisation, the augmentation and the random picks):

- `random25-unet`, `random25-unetpp`: the paper's baseline, a random 25 % of the slices of each stack, U-net
  (MONAI BasicUNet, same widths) and U-net++;
- `qunet`: QU-net++. S0 from image quality alone (qunet.selection.select_initial), train a U-net++ on S0 (stage 1,
  reported as `s0`), score every other slice with Q = J(L3, L4) and take Algorithm 1's Sm = {Q < q0}, then train
  further on S0 + Sm (stage 2);
- `random-equal`: the same two-stage loop with random picks of exactly the same per-stack counts (|S0| first,
  then |Sm| more): equal annotation cost;
- `mcdropout-equal`: MONAI Label-style epistemic active learning at equal cost (qunet_bench.uncertainty):
  the same S0, a U-net++ with dropout trained on it, the |Sm| most uncertain slices of each stack added for stage 2;
- `random-unetpp@F` for each extra fraction F: more points on the random U-net++ curve of the plot.

Every training stage is one run of the recipe (max_epochs x steps_per_epoch updates): single-stage models train
two runs' worth, two-stage ones one run per stage (stage 2 continues from stage 1's weights, as the paper's
"further trained").
"""

import contextlib
import io
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from monai.networks.nets import BasicUNet

from qunet.config import DEFAULT_FEATURES, ModelConfig, QualityConfig, SelectionConfig, TrainConfig
from qunet.disagreement import disagreement_scores, segment
from qunet.metrics import slice_metrics, stack_metrics
from qunet.network import build_network, default_device, prepare
from qunet.quality import slice_quality
from qunet.selection import select_by_disagreement, select_initial
from qunet.training import seed_everything, train

from qunet_bench.data import Case, load_cases, training_set
from qunet_bench.table1_report import METRIC_NAMES, Result, report
from qunet_bench.uncertainty import mc_dropout_scores

METHODS = ("random25-unet", "random25-unetpp", "qunet", "random-equal", "mcdropout-equal")


@dataclass(frozen=True)
class ExperimentConfig(QualityConfig):  # the quality and S0 settings, plus:
    """Defaults are the app's (qunet.config); reduce features, epochs and seeds on a CPU."""

    seeds: int = 20
    first_seed: int = 0
    patch_size: int = ModelConfig.patch_size
    features: tuple[int, ...] = DEFAULT_FEATURES
    train: TrainConfig = field(default_factory=TrainConfig)  # one training stage
    random_fraction: float = 0.25
    extra_fractions: tuple[float, ...] = ()
    q0: float = SelectionConfig.q0
    sm_limit: int | None = None  # at most this many Sm slices per stack; None = all with Q < q0 (Algorithm 1)
    s0_roi: str = (
        "auto"  # "auto": the app's automatic foreground ROI; "label": the ground truth, as the paper's notebook
    )
    mc_passes: int = 5
    mc_dropout: float = 0.2
    mc_score: str = "entropy"  # or "variance"
    methods: tuple[str, ...] = METHODS
    device: str | None = None  # None: CUDA when available, else CPU

    def __post_init__(self) -> None:
        if len(self.features) != 6:
            raise ValueError(f"features needs six integers, got {self.features}")
        if self.patch_size < 16 or self.patch_size % 16:
            raise ValueError(f"patch size must be a multiple of 16 (four poolings), got {self.patch_size}")
        unknown = set(self.methods) - set(METHODS)
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
        if self.s0_roi not in ("auto", "label"):
            raise ValueError(f"s0_roi must be auto or label, got {self.s0_roi!r}")
        if self.mc_score not in ("entropy", "variance"):
            raise ValueError(f"mc_score must be entropy or variance, got {self.mc_score!r}")
        if self.seeds < 1 or self.mc_passes < 2:
            raise ValueError("need seeds >= 1 and mc_passes >= 2")
        for f in (self.random_fraction, *self.extra_fractions):
            if not 0 < f < 1:
                raise ValueError(f"fractions must lie in (0, 1), got {f}")


def initial_sets(cases: Sequence[Case], config: ExperimentConfig) -> dict[str, list[int]]:
    """S0 of every stack, as the app picks it (or with the ground truth as ROI, as the paper's notebook did)."""
    return {
        c.name: select_initial(
            slice_quality(c.volume, c.truth if config.s0_roi == "label" else None, config.median_window), config
        )
        for c in cases
    }


def build_model(kind: str, config: ExperimentConfig, seed: int, dropout: float = 0.0) -> torch.nn.Module:
    """'unetpp' (qunet.network's U-net++) or 'unet' (MONAI BasicUNet with the same widths), seeded."""
    seed_everything(seed)
    if kind == "unetpp":
        return build_network(config.features, 1, dropout)
    with contextlib.redirect_stdout(io.StringIO()):  # BasicUNet prints its features
        return BasicUNet(spatial_dims=2, in_channels=1, out_channels=1, features=config.features, dropout=dropout)


def evaluate(network, cases: list[Case], train_sets: dict[str, list[int]], config: ExperimentConfig, device) -> tuple:
    """Table I's metrics on every slice not in the training set: per stack (slice means, voxel Dice) and pooled."""
    per_stack, pooled_slices, counts, test_sets = {}, {k: [] for k in METRIC_NAMES}, np.zeros(3), {}
    prepare(network, device)
    for case in cases:
        test = [k for k in range(case.depth) if k not in set(train_sets[case.name])]
        test_sets[case.name] = test
        if not test:
            continue
        pred, truth = segment(network, case.volume, config.patch_size, test, device) > 0, case.truth[:, :, test]
        values = slice_metrics(pred, truth)
        per_stack[case.name] = {
            **{k: float(v.mean()) for k, v in values.items()},
            "dice_voxels": stack_metrics(pred, truth)["dice"],
        }
        for k, v in values.items():
            pooled_slices[k].append(v)
        counts += [(pred & truth).sum(), (pred & ~truth).sum(), (~pred & truth).sum()]
    pooled = {k: float(np.concatenate(v).mean()) if v else float("nan") for k, v in pooled_slices.items()}
    tp, fp, fn = counts
    pooled["dice_voxels"] = (
        float(2 * tp / (2 * tp + fp + fn)) if (tp + fp + fn) else (1.0 if per_stack else float("nan"))
    )
    return test_sets, per_stack, pooled


def random_subsets(
    cases: list[Case], counts: dict[str, int], rng: np.random.Generator, exclude=None
) -> dict[str, list[int]]:
    out = {}
    for case in cases:
        pool = [k for k in range(case.depth) if k not in set((exclude or {}).get(case.name, ()))]
        n = min(counts[case.name], len(pool))
        out[case.name] = sorted(int(k) for k in rng.choice(pool, size=n, replace=False)) if n else []
    return out


class Runner:
    """Trains and evaluates the methods of one experiment; `progress(method)` is called after each trained model."""

    def __init__(
        self, cases: list[Case], config: ExperimentConfig, progress: Callable[[str], None] | None = None
    ) -> None:
        self.cases = cases
        self.config = config
        self.s0 = initial_sets(cases, config)
        self.device = torch.device(config.device) if config.device else default_device()
        self.progress = progress or (lambda _msg: None)

    def fit(self, network, train_sets: dict[str, list[int]], stages: int, seed: int):
        settings = replace(self.config.train, max_epochs=self.config.train.max_epochs * stages)
        train(
            network,
            training_set(self.cases, train_sets),
            settings,
            self.config.patch_size,
            seed=seed,
            device=self.device,
        )
        return network

    def result(self, network, seed: int, method: str, train_sets: dict[str, list[int]], start: float) -> Result:
        test, per_stack, pooled = evaluate(network, self.cases, train_sets, self.config, self.device)
        self.progress(method)
        lesion = {c.name: int(c.truth[:, :, train_sets[c.name]].any(axis=(0, 1)).sum()) for c in self.cases}
        return Result(
            seed,
            method,
            {k: list(v) for k, v in train_sets.items()},
            test,
            per_stack,
            pooled,
            round(time.perf_counter() - start, 2),
            lesion,
        )

    def random_fraction(self, seed: int, fraction: float, kind: str, method: str) -> Result:
        start = time.perf_counter()
        rng = np.random.default_rng([seed, int(round(fraction * 1000))])
        counts = {c.name: max(1, int(round(fraction * c.depth))) for c in self.cases}
        sets = random_subsets(self.cases, counts, rng)
        net = self.fit(build_model(kind, self.config, seed), sets, 2, seed)
        return self.result(net, seed, method, sets, start)

    def qunet(self, seed: int) -> tuple[Result, Result, dict[str, int]]:
        """Stage 1 on S0, Algorithm 1 on the other slices, stage 2 on S0 + Sm; also returns |Sm| per stack."""
        c = self.config
        start = time.perf_counter()
        s0 = {name: list(v) for name, v in self.s0.items()}
        net = self.fit(build_model("unetpp", c, seed), s0, 1, seed)
        stage1 = self.result(net, seed, "s0", s0, start)
        chosen = {}
        for case in self.cases:
            todo = [k for k in range(case.depth) if k not in set(s0[case.name])]
            q = disagreement_scores(net, case.volume, c.patch_size, todo, self.device)
            chosen[case.name] = select_by_disagreement(q, c.q0, s0[case.name], c.sm_limit)
        sets = {name: sorted(s0[name] + chosen[name]) for name in s0}
        net = self.fit(net, sets, 1, seed + 10_000)
        final = self.result(net, seed, "qunet", sets, start)
        return stage1, final, {name: len(v) for name, v in chosen.items()}

    def random_equal(self, seed: int, sm_counts: dict[str, int]) -> tuple[Result, Result]:
        c = self.config
        start = time.perf_counter()
        rng = np.random.default_rng([seed, 7])
        first = random_subsets(self.cases, {name: len(v) for name, v in self.s0.items()}, rng)
        net = self.fit(build_model("unetpp", c, seed), first, 1, seed)
        stage1 = self.result(net, seed, "random-equal-stage1", first, start)
        more = random_subsets(self.cases, sm_counts, rng, exclude=first)
        sets = {name: sorted(first[name] + more[name]) for name in first}
        net = self.fit(net, sets, 1, seed + 10_000)
        return stage1, self.result(net, seed, "random-equal", sets, start)

    def mcdropout_equal(self, seed: int, sm_counts: dict[str, int]) -> tuple[Result, Result]:
        c = self.config
        start = time.perf_counter()
        s0 = {name: list(v) for name, v in self.s0.items()}
        net = self.fit(build_model("unetpp", c, seed, c.mc_dropout), s0, 1, seed)
        stage1 = self.result(net, seed, "mcdropout-stage1", s0, start)
        sets = {}
        for case in self.cases:
            todo = [k for k in range(case.depth) if k not in set(s0[case.name])]
            scores = mc_dropout_scores(
                net, case.volume, todo, c.mc_passes, c.mc_score == "variance", c.patch_size, self.device, seed
            )
            order = sorted(range(len(todo)), key=lambda i: (-scores[i], todo[i]))  # most uncertain first
            sets[case.name] = sorted(s0[case.name] + [todo[i] for i in order[: sm_counts[case.name]]])
        net = self.fit(net, sets, 1, seed + 10_000)
        return stage1, self.result(net, seed, "mcdropout-equal", sets, start)

    def models_per_seed(self) -> int:
        m = self.config.methods
        n = ("random25-unet" in m) + ("random25-unetpp" in m) + len(self.config.extra_fractions)
        n += 2 * (("qunet" in m) or ("random-equal" in m) or ("mcdropout-equal" in m))
        return n + 2 * ("random-equal" in m) + 2 * ("mcdropout-equal" in m)

    def run_seed(self, seed: int) -> list[Result]:
        m, c = self.config.methods, self.config
        results = []
        if "random25-unet" in m:
            results.append(self.random_fraction(seed, c.random_fraction, "unet", "random25-unet"))
        if "random25-unetpp" in m:
            results.append(self.random_fraction(seed, c.random_fraction, "unetpp", "random25-unetpp"))
        for f in c.extra_fractions:
            results.append(self.random_fraction(seed, f, "unetpp", f"random-unetpp@{f:g}"))
        if {"qunet", "random-equal", "mcdropout-equal"} & set(m):
            stage1, final, sm_counts = self.qunet(seed)
            results += [stage1, final]
            if "random-equal" in m:
                results += self.random_equal(seed, sm_counts)
            if "mcdropout-equal" in m:
                results += self.mcdropout_equal(seed, sm_counts)
        return results


def run_experiment(
    pairs: Sequence[tuple[Path, Path]],
    config: ExperimentConfig,
    out: str | Path,
    title: str = "",
    command: str = "",
    show_progress: bool = True,
) -> dict:
    """Load the stacks, run every seed, write table.md, table.csv, runs.csv, dice_vs_fraction.png and settings.json."""
    start = time.perf_counter()
    cases = load_cases(pairs)
    runner = Runner(cases, config)
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(
            total=runner.models_per_seed() * config.seeds,
            unit="model",
            file=sys.stderr,
            dynamic_ncols=True,
            mininterval=1.0,
        )
        runner.progress = lambda method: (bar.set_description(method), bar.update(1))
    results: list[Result] = []
    try:
        for seed in range(config.first_seed, config.first_seed + config.seeds):
            results += runner.run_seed(seed)
    finally:
        if bar is not None:
            bar.close()
    title = title or f"QU-net++ experiment on {', '.join(c.name for c in cases)}"
    return report(results, cases, runner.s0, config, Path(out), title, command, time.perf_counter() - start)
