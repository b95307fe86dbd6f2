"""Stacks with full labels for experiments, the simulated annotator's draws, and evaluation on unseen slices.

Every experiment trains with the app's recipe (qunet.training) on slices whose ground truth it "annotates", and
evaluates with the app's inference (qunet.disagreement.segment) on the slices it did not train on.
"""

import fnmatch
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qunet.disagreement import segment
from qunet.io import IMAGE_SUFFIXES, StackError, load_label, load_stack, stack_id
from qunet.slices import TrainingSlice, training_slices


@dataclass
class Case:
    """One stack with its full label."""

    name: str
    volume: np.ndarray  # (X, Y, Z) float32, as loaded
    truth: np.ndarray  # (X, Y, Z) bool foreground
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))  # voxel-to-RAS, as loaded (generated: identity)

    @property
    def depth(self) -> int:
        return int(self.volume.shape[2])

    @property
    def lesion_slices(self) -> list[int]:
        return [int(k) for k in np.flatnonzero(self.truth.any(axis=(0, 1)))]

    def slices(self, ks: Sequence[int]) -> list[TrainingSlice]:
        return training_slices(self.volume, self.truth.astype(np.uint8), list(ks), 1, self.name)


def find_pairs(
    data: str | Path,
    labels: str | Path | None = None,
    include: Sequence[str] = (),
    label_replace: tuple[str, str] | None = None,
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


def load_cases(pairs: Sequence[tuple[Path, Path]]) -> list[Case]:
    cases = []
    for image_path, label_path in pairs:
        stack = load_stack(image_path)
        cases.append(Case(stack_id(image_path), stack.array, load_label(label_path, stack) > 0, stack.affine))
    return cases


def proportional_shares(total: int, weights: Sequence[float]) -> list[int]:
    """`total` split in proportion to `weights` by largest remainder."""
    share = np.asarray(weights, float) / max(float(np.sum(weights)), 1e-12) * total
    counts = np.floor(share).astype(int)
    for i in np.argsort(-(share - counts), kind="stable")[: total - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


def per_stack_picks(
    cases: Sequence[Case], annotated: Mapping[str, Set[int]], n: int, next_slice: Callable[[Case, list[int]], int]
) -> list[tuple[str, int]]:
    """`n` new slices, each stack's share in proportion to its depth; within a stack `next_slice(case, taken)` names
    each one, `taken` holding its annotated slices and those picked before it."""
    chosen = []
    for case, share in zip(cases, proportional_shares(n, [c.depth for c in cases])):
        taken = sorted(annotated[case.name])
        for _ in range(min(share, case.depth - len(taken))):
            taken.append(next_slice(case, taken))
            chosen.append((case.name, taken[-1]))
    return chosen


def stratified_draw(
    cases: Sequence[Case], total: int, rng: np.random.Generator, per_stack: bool = False
) -> dict[str, list[int]]:
    """`total` annotated slices over a cohort (`per_stack`: in every stack, leaving one unseen), each stack's share
    in proportion to its depth, and within a stack its lesion slices in proportion (at least one while another
    lesion slice stays unseen for testing)."""
    picks = {}
    shares = (
        [min(total, c.depth - 1) for c in cases] if per_stack else proportional_shares(total, [c.depth for c in cases])
    )
    for case, n in zip(cases, shares):
        lesion = case.lesion_slices
        other = [k for k in range(case.depth) if k not in set(lesion)]
        n = min(n, case.depth)
        want = round(n * len(lesion) / case.depth)
        if len(lesion) > 1 and n > 0:
            want = min(max(want, 1), len(lesion) - 1)
        want = max(min(want, len(lesion)), n - len(other))
        chosen = list(rng.choice(lesion, want, replace=False)) + list(rng.choice(other, n - want, replace=False))
        picks[case.name] = sorted(int(k) for k in chosen)
    return picks


def training_set(cases: Sequence[Case], picks: dict[str, list[int]]) -> list[TrainingSlice]:
    return [s for c in cases for s in c.slices(picks.get(c.name, []))]


@dataclass
class Evaluation:
    """Voxel Dice of one model on the slices each stack was not trained on: over all of them (false positives on
    lesion-free slices count) and over the unseen slices that hold lesion."""

    per_stack: dict[str, dict[str, float]]
    pooled: dict[str, float]


def _dice(tp: int, fp: int, fn: int) -> float:
    return 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0


@torch.inference_mode()
def evaluate(
    network: torch.nn.Module,
    cases: Sequence[Case],
    trained: dict[str, list[int]],
    patch_size: int,
    device: torch.device,
) -> Evaluation:
    per_stack, totals = {}, np.zeros((2, 3), np.int64)
    for case in cases:
        test = [k for k in range(case.depth) if k not in set(trained.get(case.name, []))]
        if not test:
            continue
        counts, per_stack[case.name] = test_counts(
            segment(network, case.volume, patch_size, test, device) > 0, case.truth[:, :, test]
        )
        totals += counts
    return Evaluation(per_stack, pooled_dice(totals))


def test_counts(found: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, dict]:
    """True positives, false positives and false negatives (rows: all test slices, the test slices with lesion) of
    a segmentation of a stack's test slices (X, Y, n), and the stack's figures."""
    lesion = truth.any(axis=(0, 1))
    counts = np.array(
        [
            [(f & t).sum(), (f & ~t).sum(), (~f & t).sum()]
            for f, t in ((found, truth), (found[:, :, lesion], truth[:, :, lesion]))
        ],
        np.int64,
    )
    on_lesion = _dice(*counts[1]) if lesion.any() else float("nan")
    return counts, {
        "dice": _dice(*counts[0]),
        "dice_lesion_slices": on_lesion,
        "test_slices": int(truth.shape[2]),
        "test_lesion_slices": int(lesion.sum()),
    }


def pooled_dice(totals: np.ndarray) -> dict[str, float]:
    return {"dice": _dice(*totals[0]), "dice_lesion_slices": _dice(*totals[1])}
