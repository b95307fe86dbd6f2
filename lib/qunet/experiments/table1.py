"""Reproduce the paper's Table I on stacks with full labels, simulating the annotator.

    python -m qunet experiment --data FOLDER [--labels DIR] --out DIR [settings]

Every stack in FOLDER needs a full ground-truth label (by default FOLDER/ground-truth/<same file name>). A
"selected" slice gets its ground-truth label, as if an annotator had drawn it; every model is evaluated on the
slices it was *not* trained on. Slices of all stacks are pooled into one training set (per-stack S0, per-stack
25 %), and metrics are reported per stack and pooled over all test slices.

Methods (each run once per seed; seeds change the network's initialisation, the augmentation and the random picks):

- `random25-unet`, `random25-unetpp`: the paper's baseline, a random 25 % of the slices of each stack, U-net
  (MONAI BasicUNet, same widths) and U-net++;
- `qunet`: QU-net++. S0 from image quality alone (qunet.selection.select_initial), train a U-net++ on S0 (stage 1,
  reported as `s0`), score every other slice with Q = J(L3, L4) and take Algorithm 1's Sm = {Q < q0}, then train
  further on S0 + Sm (stage 2);
- `random-equal`: the same two-stage loop with random picks of exactly the same per-stack counts (|S0| first,
  then |Sm| more): equal annotation cost;
- `mcdropout-equal`: MONAI Label-style epistemic active learning at equal cost: the same S0, a U-net++ with
  dropout trained on it, several stochastic passes (dropout on, nothing else in train mode) scoring each slice by
  the mean entropy (or variance) of its level-4 probabilities as MONAI Label's EpistemicScoring does, and the
  |Sm| most uncertain slices of each stack added for stage 2;
- `random-unetpp@F` for each extra fraction F: more points on the random U-net++ curve of the plot.

Every model gets the same number of gradient steps when `steps_per_epoch` is set: single-stage models train
2 x epochs, two-stage ones epochs per stage (stage 2 continues from stage 1's weights, as the paper's
"further trained").
"""

import csv
import fnmatch
import json
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from qunet.config import DEFAULT_FEATURES, ModelConfig, QualityConfig, SelectionConfig, TrainConfig
from qunet.disagreement import disagreement_scores, prepare
from qunet.io import IMAGE_SUFFIXES, StackError, load_label, load_stack, stack_id
from qunet.metrics import METRICS, slice_metrics, stack_metrics
from qunet.network import build_network, default_device
from qunet.quality import slice_quality
from qunet.selection import select_by_disagreement, select_initial
from qunet.slices import from_network, training_pairs
from qunet.training import seed_everything, train

METHODS = ("random25-unet", "random25-unetpp", "qunet", "random-equal", "mcdropout-equal")
METRIC_NAMES = tuple(METRICS)  # precision, recall, jaccard, dice, accuracy
TABLE_COLUMNS = {"precision": "Pr", "recall": "Re", "jaccard": "J", "dice": "D", "accuracy": "Acc", "dice_voxels": "D vox"}
LABEL = {
    "random25-unet": ("Random 25%", "U-net"),
    "random25-unetpp": ("Random 25%", "U-net++"),
    "s0": ("S0 only (quality pick, stage 1)", "U-net++"),
    "qunet": ("QU-net++ (S0 + Sm)", "U-net++"),
    "random-equal-stage1": ("Random, S0 count per stack (stage 1)", "U-net++"),
    "random-equal": ("Random, same count as QU-net++", "U-net++"),
    "mcdropout-stage1": ("S0, dropout net (MC stage 1)", "U-net++ (dropout)"),
    "mcdropout-equal": ("MC dropout, same count as QU-net++", "U-net++ (dropout)"),
}


@dataclass(frozen=True)
class ExperimentConfig(QualityConfig):  # the quality and S0 settings, plus:
    """Defaults are the paper's recipe (qunet.config); reduce image size, features, epochs and seeds on a CPU."""

    seeds: int = 20
    first_seed: int = 0
    image_size: int = ModelConfig.image_size
    features: tuple[int, ...] = DEFAULT_FEATURES
    epochs: int = TrainConfig.max_epochs
    steps_per_epoch: int | None = None  # None: one pass over the training slices per epoch
    batch_size: int = TrainConfig.batch_size
    learning_rate: float = TrainConfig.learning_rate
    augment_range: float = TrainConfig.augment_range
    random_fraction: float = 0.25
    extra_fractions: tuple[float, ...] = ()
    q0: float = SelectionConfig.q0
    sm_limit: int | None = None  # at most this many Sm slices per stack; None = all with Q < q0 (Algorithm 1)
    s0_roi: str = "auto"  # "auto": the app's automatic foreground ROI; "label": the ground truth, as the paper's notebook
    mc_passes: int = 5
    mc_dropout: float = 0.2
    mc_score: str = "entropy"  # or "variance"
    score_batch_size: int = SelectionConfig.score_batch_size
    methods: tuple[str, ...] = METHODS
    device: str | None = None  # None: CUDA when available, else CPU

    def __post_init__(self) -> None:
        if len(self.features) != 6:
            raise ValueError(f"features needs six integers, got {self.features}")
        if self.image_size < 16 or self.image_size % 16:
            raise ValueError(f"image size must be a multiple of 16 (four poolings), got {self.image_size}")
        unknown = set(self.methods) - set(METHODS)
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
        if self.s0_roi not in ("auto", "label"):
            raise ValueError(f"s0_roi must be auto or label, got {self.s0_roi!r}")
        if self.mc_score not in ("entropy", "variance"):
            raise ValueError(f"mc_score must be entropy or variance, got {self.mc_score!r}")
        if self.seeds < 1 or self.epochs < 1 or self.mc_passes < 2:
            raise ValueError("need seeds >= 1, epochs >= 1 and mc_passes >= 2")
        for f in (self.random_fraction, *self.extra_fractions):
            if not 0 < f < 1:
                raise ValueError(f"fractions must lie in (0, 1), got {f}")


# ----------------------------------------------------------------------------------------------- data


@dataclass
class Case:
    """One stack with its full label, prepared once: network inputs and targets for every slice."""

    name: str
    volume: np.ndarray  # (X, Y, Z) float32, as loaded
    truth: np.ndarray  # (X, Y, Z) bool foreground
    x: torch.Tensor  # (Z, 1, S, S)
    y: torch.Tensor  # (Z, 1, S, S) binary
    s0: list[int] = field(default_factory=list)

    @property
    def depth(self) -> int:
        return int(self.volume.shape[2])


def find_pairs(
    data: str | Path, labels: str | Path | None = None, include: Sequence[str] = (), label_replace: tuple[str, str] | None = None
) -> list[tuple[Path, Path]]:
    """(image, label) paths: images in `data` (not recursive) matching any `include` glob, labels of the same
    file name in `labels` (default data/ground-truth), or with `label_replace` = (old, new) applied to the name."""
    data = Path(data)
    if not data.is_dir():
        raise StackError(f"{data}: not a folder")
    labels = Path(labels) if labels else data / "ground-truth"
    images = sorted(p for p in data.iterdir() if p.is_file() and p.name.endswith(IMAGE_SUFFIXES))
    if include:
        images = [p for p in images if any(fnmatch.fnmatch(p.name, g) for g in include)]
    pairs, missing = [], []
    for image in images:
        name = image.name.replace(*label_replace) if label_replace else image.name
        label = labels / name
        if label == image or not label.is_file():
            missing.append(image.name)
        else:
            pairs.append((image, label))
    if missing and not label_replace:
        raise StackError(f"no label in {labels} for {', '.join(missing)} (use --include to pick stacks)")
    if not pairs:
        raise StackError(f"no image with a label in {data} (labels looked up in {labels})")
    return pairs


def load_cases(pairs: Sequence[tuple[Path, Path]], config: ExperimentConfig) -> list[Case]:
    cases = []
    for image_path, label_path in pairs:
        stack = load_stack(image_path)
        label = load_label(label_path, stack)
        truth = label > 0
        everything = list(range(stack.num_slices))
        x, y = training_pairs(stack.array, truth.astype(np.uint8), everything, config.image_size, 1)
        roi = label if config.s0_roi == "label" else None  # None: the app's automatic foreground ROI
        quality = slice_quality(stack.array, roi, config.median_window)
        s0 = select_initial(quality, config)
        cases.append(Case(stack_id(image_path), stack.array, truth, x, y, s0))
    return cases


# ----------------------------------------------------------------------------------------------- models


def build_model(kind: str, config: ExperimentConfig, seed: int, dropout: float = 0.0) -> torch.nn.Module:
    """'unetpp' (qunet.network's U-net++) or 'unet' (MONAI BasicUNet with the same widths), seeded."""
    seed_everything(seed)
    if kind == "unetpp":
        return build_network(config.features, 1, dropout)
    import contextlib
    import io

    from monai.networks.nets import BasicUNet

    with contextlib.redirect_stdout(io.StringIO()):  # BasicUNet prints its features
        return BasicUNet(spatial_dims=2, in_channels=1, out_channels=1, features=config.features, dropout=dropout)


def final_output(out) -> torch.Tensor:
    return out[-1] if isinstance(out, (list, tuple)) else out


@torch.inference_mode()
def predict(network: torch.nn.Module, case: Case, slices: Sequence[int], batch_size: int, device: torch.device) -> np.ndarray:
    """(X, Y, n) boolean level-4 (or U-net) foreground of the given slices, on the stack's own grid."""
    network.eval()
    out = np.zeros((*case.volume.shape[:2], len(slices)), bool)
    for start in range(0, len(slices), batch_size):
        chunk = list(slices[start : start + batch_size])
        x = case.x[chunk].to(device=device, memory_format=torch.channels_last)
        probs = torch.sigmoid(final_output(network(x)))
        out[:, :, start : start + len(chunk)] = from_network(probs, case.volume.shape[:2]) > 0
    return out


def enable_dropout_only(network: torch.nn.Module) -> torch.nn.Module:
    """eval() everywhere except dropout layers: Monte Carlo dropout, as MONAI Label's train_mode infer."""
    network.eval()
    for m in network.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.train()
    return network


def epistemic_slice_scores(probs: np.ndarray, use_variance: bool = False) -> np.ndarray:
    """Per-slice uncertainty from (passes, N, C, S, S) probabilities, MONAI Label EpistemicScoring's formulas:
    entropy: probabilities <= 0 set to 5e-5, p = mean over passes, sum over channels of -p log p;
    variance: probabilities <= 0 set to 5e-4, variance over passes, summed over channels; then the mean over pixels."""
    probs = np.array(probs, dtype=np.float32)
    if use_variance:
        probs[probs <= 0] = 0.0005
        per_pixel = np.nanvar(probs, axis=0).sum(axis=1)
    else:
        probs[probs <= 0] = 0.00005
        mean = probs.mean(axis=0)
        per_pixel = (-mean * np.log(mean)).sum(axis=1)
    return np.nanmean(per_pixel.reshape(per_pixel.shape[0], -1), axis=1)


@torch.inference_mode()
def mc_dropout_scores(
    network: torch.nn.Module, case: Case, slices: Sequence[int], passes: int, use_variance: bool, batch_size: int,
    device: torch.device, seed: int,
) -> np.ndarray:
    """Uncertainty of each given slice from `passes` stochastic level-4 predictions (dropout on)."""
    enable_dropout_only(network)
    torch.manual_seed(seed)
    scores = []
    for start in range(0, len(slices), batch_size):
        chunk = list(slices[start : start + batch_size])
        x = case.x[chunk].to(device=device, memory_format=torch.channels_last)
        probs = torch.stack([torch.sigmoid(final_output(network(x))) for _ in range(passes)]).float().cpu().numpy()
        scores.append(epistemic_slice_scores(probs, use_variance))
    network.eval()
    return np.concatenate(scores) if scores else np.zeros(0)


# ----------------------------------------------------------------------------------------------- one run


@dataclass
class Result:
    """One trained model's evaluation: which slices it saw, and its metrics on the others."""

    seed: int
    method: str
    train: dict[str, list[int]]  # per stack
    test: dict[str, list[int]]
    per_stack: dict[str, dict[str, float]]
    pooled: dict[str, float]
    seconds: float = 0.0
    lesion: dict[str, int] = field(default_factory=dict)  # training slices holding foreground, per stack

    @property
    def n_train(self) -> int:
        return sum(len(v) for v in self.train.values())

    @property
    def n_test(self) -> int:
        return sum(len(v) for v in self.test.values())

    @property
    def n_lesion(self) -> int:
        return sum(self.lesion.values())


def evaluate(network, cases: list[Case], train_sets: dict[str, list[int]], config: ExperimentConfig, device) -> tuple:
    """Metrics on every slice not in the training set: per stack (slice means and voxel Dice) and pooled."""
    per_stack, pooled_slices, counts = {}, {k: [] for k in METRIC_NAMES}, np.zeros(3)
    test_sets = {}
    for case in cases:
        seen = set(train_sets[case.name])
        test = [k for k in range(case.depth) if k not in seen]
        test_sets[case.name] = test
        if not test:
            continue
        pred, truth = predict(network, case, test, config.score_batch_size, device), case.truth[:, :, test]
        values = slice_metrics(pred, truth)
        row = {k: float(v.mean()) for k, v in values.items()}
        row["dice_voxels"] = stack_metrics(pred, truth)["dice"]
        per_stack[case.name] = row
        for k, v in values.items():
            pooled_slices[k].append(v)
        counts += [(pred & truth).sum(), (pred & ~truth).sum(), (~pred & truth).sum()]
    pooled = {k: float(np.concatenate(v).mean()) if v else float("nan") for k, v in pooled_slices.items()}
    tp, fp, fn = counts
    pooled["dice_voxels"] = float(2 * tp / (2 * tp + fp + fn)) if (tp + fp + fn) else (1.0 if per_stack else float("nan"))
    return test_sets, per_stack, pooled


def random_subsets(cases: list[Case], counts: dict[str, int], rng: np.random.Generator, exclude=None) -> dict[str, list[int]]:
    out = {}
    for case in cases:
        pool = [k for k in range(case.depth) if k not in set((exclude or {}).get(case.name, ()))]
        n = min(counts[case.name], len(pool))
        out[case.name] = sorted(int(k) for k in rng.choice(pool, size=n, replace=False)) if n else []
    return out


class Runner:
    """Trains and evaluates the methods of one experiment; `progress(n)` is called after each trained model."""

    def __init__(self, cases: list[Case], config: ExperimentConfig, progress: Callable[[str], None] | None = None,
                 on_step: Callable[[float], None] | None = None) -> None:
        self.cases = cases
        self.config = config
        self.device = torch.device(config.device) if config.device else default_device()
        self.progress = progress or (lambda _msg: None)
        self.on_step = on_step

    def fit(self, network, train_sets: dict[str, list[int]], epochs: int, seed: int):
        x = torch.cat([c.x[train_sets[c.name]] for c in self.cases if train_sets[c.name]])
        y = torch.cat([c.y[train_sets[c.name]] for c in self.cases if train_sets[c.name]])
        c = self.config
        train(network, x, y, epochs=epochs, batch_size=c.batch_size, learning_rate=c.learning_rate,
              augment_range=c.augment_range, steps_per_epoch=c.steps_per_epoch, seed=seed, device=self.device,
              on_step=self.on_step)
        return network

    def result(self, network, seed: int, method: str, train_sets: dict[str, list[int]], start: float) -> Result:
        test, per_stack, pooled = evaluate(network, self.cases, train_sets, self.config, self.device)
        self.progress(method)
        lesion = {c.name: int(c.truth[:, :, train_sets[c.name]].any(axis=(0, 1)).sum()) for c in self.cases}
        return Result(seed, method, {k: list(v) for k, v in train_sets.items()}, test, per_stack, pooled,
                      round(time.perf_counter() - start, 2), lesion)

    def random_fraction(self, seed: int, fraction: float, kind: str, method: str) -> Result:
        start = time.perf_counter()
        rng = np.random.default_rng([seed, int(round(fraction * 1000))])
        counts = {c.name: max(1, int(round(fraction * c.depth))) for c in self.cases}
        sets = random_subsets(self.cases, counts, rng)
        net = self.fit(build_model(kind, self.config, seed), sets, 2 * self.config.epochs, seed)
        return self.result(net, seed, method, sets, start)

    def qunet(self, seed: int) -> tuple[Result, Result, dict[str, int]]:
        """Stage 1 on S0, Algorithm 1 on the other slices, stage 2 on S0 + Sm; also returns |Sm| per stack."""
        c = self.config
        start = time.perf_counter()
        s0 = {case.name: list(case.s0) for case in self.cases}
        net = self.fit(build_model("unetpp", c, seed), s0, c.epochs, seed)
        stage1 = self.result(net, seed, "s0", s0, start)
        scoring = prepare(net, self.device)
        chosen = {}
        for case in self.cases:
            todo = [k for k in range(case.depth) if k not in set(s0[case.name])]
            q = disagreement_scores(scoring, case.volume, c.image_size, c.score_batch_size, todo, self.device)
            chosen[case.name] = select_by_disagreement(q, c.q0, s0[case.name], c.sm_limit)
        sets = {name: sorted(s0[name] + chosen[name]) for name in s0}
        net = self.fit(net, sets, c.epochs, seed + 10_000)
        final = self.result(net, seed, "qunet", sets, start)
        return stage1, final, {name: len(v) for name, v in chosen.items()}

    def random_equal(self, seed: int, sm_counts: dict[str, int]) -> tuple[Result, Result]:
        c = self.config
        start = time.perf_counter()
        rng = np.random.default_rng([seed, 7])
        first = random_subsets(self.cases, {case.name: len(case.s0) for case in self.cases}, rng)
        net = self.fit(build_model("unetpp", c, seed), first, c.epochs, seed)
        stage1 = self.result(net, seed, "random-equal-stage1", first, start)
        more = random_subsets(self.cases, sm_counts, rng, exclude=first)
        sets = {name: sorted(first[name] + more[name]) for name in first}
        net = self.fit(net, sets, c.epochs, seed + 10_000)
        return stage1, self.result(net, seed, "random-equal", sets, start)

    def mcdropout_equal(self, seed: int, sm_counts: dict[str, int]) -> tuple[Result, Result]:
        c = self.config
        start = time.perf_counter()
        s0 = {case.name: list(case.s0) for case in self.cases}
        net = self.fit(build_model("unetpp", c, seed, c.mc_dropout), s0, c.epochs, seed)
        stage1 = self.result(net, seed, "mcdropout-stage1", s0, start)
        sets = {}
        for case in self.cases:
            todo = [k for k in range(case.depth) if k not in set(s0[case.name])]
            scores = mc_dropout_scores(net, case, todo, c.mc_passes, c.mc_score == "variance", c.score_batch_size,
                                       self.device, seed)
            order = sorted(range(len(todo)), key=lambda i: (-scores[i], todo[i]))  # most uncertain first
            sets[case.name] = sorted(s0[case.name] + [todo[i] for i in order[: sm_counts[case.name]]])
        net = self.fit(net, sets, c.epochs, seed + 10_000)
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


# ----------------------------------------------------------------------------------------------- reporting


def method_label(method: str) -> tuple[str, str]:
    if method.startswith("random-unetpp@"):
        return f"Random {float(method.split('@')[1]) * 100:g}%", "U-net++"
    return LABEL.get(method, (method, "U-net++"))


def summarise(results: list[Result], cases: list[Case]) -> list[dict]:
    """One row per method (in run order), plus one per method and stack: means and SDs over seeds."""
    total = sum(c.depth for c in cases)
    methods = list(dict.fromkeys(r.method for r in results))
    rows = []
    for method in methods:
        runs = [r for r in results if r.method == method]
        for stack in ["all", *[c.name for c in cases]]:
            values = [r.pooled if stack == "all" else r.per_stack.get(stack) for r in runs]
            values = [v for v in values if v]
            if not values:
                continue
            n_train = [r.n_train if stack == "all" else len(r.train[stack]) for r in runs]
            n_test = [r.n_test if stack == "all" else len(r.test[stack]) for r in runs]
            n_lesion = [r.n_lesion if stack == "all" else r.lesion.get(stack, 0) for r in runs]
            depth = total if stack == "all" else next(c.depth for c in cases if c.name == stack)
            label, model = method_label(method)
            row = {"stack": stack, "method": method, "label": label, "model": model, "seeds": len(runs),
                   "n_train": float(np.mean(n_train)), "n_train_sd": _sd(n_train), "n_test": float(np.mean(n_test)),
                   "n_test_sd": _sd(n_test), "n_train_lesion": float(np.mean(n_lesion)),
                   "fraction": float(np.mean(n_train)) / depth}
            for k in TABLE_COLUMNS:
                row[k] = float(np.mean([v[k] for v in values]))
                row[f"{k}_sd"] = _sd([v[k] for v in values])
            rows.append(row)
    return rows


def _sd(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _count(mean: float, sd: float) -> str:
    return f"{mean:.0f}" if sd == 0 else f"{mean:.1f}"


def markdown_table(rows: list[dict], stack: str = "all") -> str:
    head = ["Method", "Model", "#train/#test", "#train with lesion", *TABLE_COLUMNS.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in (r for r in rows if r["stack"] == stack):
        cells = [r["label"], r["model"], f"{_count(r['n_train'], r['n_train_sd'])}/{_count(r['n_test'], r['n_test_sd'])}",
                 f"{r['n_train_lesion']:.1f}"]
        cells += ["–" if r[k] != r[k] else f"{r[k]:.2f} ± {r[k + '_sd']:.2f}" for k in TABLE_COLUMNS]  # – : no test slice
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_stack_dice_table(rows: list[dict], cases: list[Case]) -> str:
    names = [c.name for c in cases]
    head = ["Method", *[f"{n} D / D vox" for n in names]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = [" ".join(method_label(method))]
        for n in names:
            r = next((r for r in rows if r["method"] == method and r["stack"] == n), None)
            cells.append(f"{r['dice']:.2f} / {r['dice_voxels']:.2f}" if r else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def run_rows(results: list[Result]) -> list[dict]:
    """Per seed, method and stack (and 'all'), with the exact slices trained on."""
    rows = []
    for r in results:
        for stack, values in [("all", r.pooled), *r.per_stack.items()]:
            train_slices = "" if stack == "all" else " ".join(map(str, r.train[stack]))
            n_train = r.n_train if stack == "all" else len(r.train[stack])
            n_test = r.n_test if stack == "all" else len(r.test[stack])
            n_lesion = r.n_lesion if stack == "all" else r.lesion.get(stack, 0)
            rows.append({"seed": r.seed, "method": r.method, "stack": stack, "n_train": n_train, "n_test": n_test,
                         "n_train_lesion": n_lesion,
                         **{k: round(values[k], 5) for k in TABLE_COLUMNS}, "seconds": r.seconds,
                         "train_slices": train_slices})
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Dice (per-slice mean, and voxel Dice) against the fraction of slices annotated, mean +- SD over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    allrows = {r["method"]: r for r in rows if r["stack"] == "all"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"qunet": ("s0", "tab:red", "o", "QU-net++ (S0 → S0+Sm)"),
              "random-equal": ("random-equal-stage1", "tab:gray", "s", "random, equal count"),
              "mcdropout-equal": ("mcdropout-stage1", "tab:blue", "^", "MC dropout, equal count")}
    for ax, key, name in zip(axes, ("dice", "dice_voxels"), ("Dice (mean over test slices)", "Dice (all test voxels)")):
        randoms = sorted((r for m, r in allrows.items() if m == "random25-unetpp" or m.startswith("random-unetpp@")),
                         key=lambda r: r["fraction"])
        if randoms:
            ax.errorbar([r["fraction"] for r in randoms], [r[key] for r in randoms], [r[key + "_sd"] for r in randoms],
                        color="tab:green", marker="D", capsize=3, label="random U-net++")
        if "random25-unet" in allrows:
            r = allrows["random25-unet"]
            ax.errorbar([r["fraction"]], [r[key]], [r[key + "_sd"]], color="tab:olive", marker="v", capsize=3,
                        linestyle="none", label="random U-net")
        for method, (first, color, marker, label) in styles.items():
            pts = [allrows[m] for m in (first, method) if m in allrows]
            if method in allrows:
                ax.errorbar([p["fraction"] for p in pts], [p[key] for p in pts], [p[key + "_sd"] for p in pts],
                            color=color, marker=marker, capsize=3, label=label, alpha=0.9)
        ax.set_xlabel("fraction of slices annotated")
        ax.set_ylabel(name)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results: list[Result], cases: list[Case], config: ExperimentConfig, out: Path, title: str,
           command: str, seconds: float) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    rows = summarise(results, cases)
    sm = [r for r in results if r.method == "qunet"]
    depth = {c.name: c.depth for c in cases}
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()}
    lines = [
        f"# {title}", "",
        f"Command: `{command}`", "",
        f"Stacks: {', '.join(f'{c.name} ({c.volume.shape[0]}x{c.volume.shape[1]}x{c.depth}, S0 {len(c.s0)})' for c in cases)}; "
        f"{sum(depth.values())} slices. Seeds: {config.seeds}. Device: {_device_name(config)}. Run time: {seconds / 60:.1f} min.", "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items() if k != "methods"), "",
        "Pooled over all stacks: metrics averaged over every test slice (the paper's per-image means; a slice with",
        "nothing predicted and nothing there scores 1), D vox = Dice over all test voxels together. Mean ± SD over seeds;",
        "each model is tested on the slices it was not trained on.", "",
        markdown_table(rows), "",
    ]
    if sm:
        counts = [r.n_train for r in sm]
        lines += [f"QU-net++ annotated {np.mean(counts):.1f} slices on average (min {min(counts)}, max {max(counts)}) "
                  f"= {np.mean(counts) / sum(depth.values()) * 100:.1f}% of {sum(depth.values())}; "
                  f"|S0| = {sum(len(c.s0) for c in cases)}.", ""]
    lines += ["Per stack (Dice, mean over seeds):", "", per_stack_dice_table(rows, cases), ""]
    text = "\n".join(lines)
    (out / "table.md").write_text(text)
    write_csv(out / "table.csv", rows)
    write_csv(out / "runs.csv", run_rows(results))
    plot(rows, out / "dice_vs_fraction.png", title)
    (out / "settings.json").write_text(json.dumps({
        "command": command, "settings": settings, "seconds": round(seconds, 1), "device": _device_name(config),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
        "stacks": {c.name: {"shape": list(c.volume.shape), "s0": c.s0} for c in cases}}, indent=1))
    return {"table": text, "rows": rows, "files": [str(out / n) for n in ("table.md", "table.csv", "runs.csv",
                                                                          "dice_vs_fraction.png", "settings.json")]}


def _device_name(config: ExperimentConfig) -> str:
    device = torch.device(config.device) if config.device else default_device()
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_experiment(pairs: Sequence[tuple[Path, Path]], config: ExperimentConfig, out: str | Path, title: str = "",
                   command: str = "", show_progress: bool = True) -> dict:
    """Load the stacks, run every seed, write table.md, table.csv, runs.csv, dice_vs_fraction.png and settings.json."""
    start = time.perf_counter()
    cases = load_cases(pairs, config)
    runner = Runner(cases, config)
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=runner.models_per_seed() * config.seeds, unit="model", file=sys.stderr, dynamic_ncols=True,
                   mininterval=1.0)
        runner.progress = lambda method: (bar.set_description(method), bar.update(1))
        runner.on_step = lambda loss: bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
    results: list[Result] = []
    try:
        for seed in range(config.first_seed, config.first_seed + config.seeds):
            results += runner.run_seed(seed)
    finally:
        if bar is not None:
            bar.close()
    title = title or f"QU-net++ experiment on {', '.join(c.name for c in cases)}"
    return report(results, cases, config, Path(out), title, command or " ".join(sys.argv), time.perf_counter() - start)


def parse_features(value: str) -> tuple[int, ...]:
    return tuple(int(v) for v in value.split(","))


def add_arguments(p) -> None:
    d = ExperimentConfig()
    p.add_argument("--data", required=True, help="folder of stacks with full labels")
    p.add_argument("--labels", help="folder of labels with the images' file names (default DATA/ground-truth)")
    p.add_argument("--include", nargs="+", default=[], metavar="GLOB", help="only images whose file name matches")
    p.add_argument("--label-replace", nargs=2, metavar=("OLD", "NEW"),
                   help="label file name = image file name with OLD replaced by NEW (e.g. _image _label)")
    p.add_argument("--out", default="experiment-results", help="folder for table.md/.csv, runs.csv, the plot")
    p.add_argument("--title", default="")
    p.add_argument("--seeds", type=int, default=d.seeds, help="repetitions (the paper: 20)")
    p.add_argument("--first-seed", type=int, default=d.first_seed)
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--features", type=parse_features, default=d.features, help="six comma-separated widths")
    p.add_argument("--epochs", type=int, default=d.epochs, help="per stage (single-stage models get twice this)")
    p.add_argument("--steps-per-epoch", type=int, default=d.steps_per_epoch,
                   help="fixed updates per epoch, so every model gets as many (default: one pass over its slices)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.learning_rate)
    p.add_argument("--augment-range", type=float, default=d.augment_range)
    p.add_argument("--random-fraction", type=float, default=d.random_fraction)
    p.add_argument("--extra-fractions", type=float, nargs="*", default=list(d.extra_fractions),
                   help="more random U-net++ points for the plot, e.g. 0.1 0.5")
    p.add_argument("--q0", type=float, default=d.q0)
    p.add_argument("--sm-limit", type=int, default=d.sm_limit, help="cap on Sm per stack (default: none)")
    p.add_argument("--max-initial", type=int, default=d.max_initial, help="cap on S0 per stack")
    p.add_argument("--min-initial", type=int, default=d.min_initial, help="S0 filled up to this many (0: cut-offs only)")
    p.add_argument("--epsilon0", type=float, default=d.epsilon0)
    p.add_argument("--blur-percentile", type=float, default=d.blur_percentile, help="S0 cut-off (default: the mean)")
    p.add_argument("--psnr-percentile", type=float, default=d.psnr_percentile, help="S0 cut-off (default: the mean)")
    p.add_argument("--s0-roi", choices=("auto", "label"), default=d.s0_roi,
                   help="ROI for S0's CoV and mean: the app's automatic foreground, or the ground truth (paper's notebook)")
    p.add_argument("--mc-passes", type=int, default=d.mc_passes)
    p.add_argument("--mc-dropout", type=float, default=d.mc_dropout)
    p.add_argument("--mc-score", choices=("entropy", "variance"), default=d.mc_score)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(d.methods))
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA when available)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true")


def config_from_args(args) -> ExperimentConfig:
    return ExperimentConfig(
        seeds=args.seeds, first_seed=args.first_seed, image_size=args.image_size, features=tuple(args.features),
        epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size,
        learning_rate=args.lr, augment_range=args.augment_range, random_fraction=args.random_fraction,
        extra_fractions=tuple(args.extra_fractions), q0=args.q0, sm_limit=args.sm_limit,
        max_initial=args.max_initial, min_initial=args.min_initial, epsilon0=args.epsilon0,
        blur_percentile=args.blur_percentile, psnr_percentile=args.psnr_percentile, s0_roi=args.s0_roi,
        mc_passes=args.mc_passes, mc_dropout=args.mc_dropout, mc_score=args.mc_score, methods=tuple(args.methods), device=args.device)


def main(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    config = config_from_args(args)
    pairs = find_pairs(args.data, args.labels, args.include, tuple(args.label_replace) if args.label_replace else None)
    command = "python -m qunet " + " ".join(_quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["experiment"] else ""
    result = run_experiment(pairs, config, args.out, args.title, command, not args.no_progress)
    print(result["table"])
    print("written: " + ", ".join(result["files"]))


def _quote(arg: str) -> str:
    return f"'{arg}'" if any(ch in arg for ch in " *?[]") else arg

