"""Reporting of the multi-round benchmark: Dice against annotated slices, AUBC, final Dice, paired differences.

AUBC (area under the budget curve, as nnActive reports it): the trapezoid area of Dice against the number of
annotated slices, from the first round to the last, divided by that span: a Dice-like number in 0-1. Paired
differences: per seed, a method's figure minus that of the default pick, of random slices and of fixed-interval
slices (each where run) of the same seed (same initial weights), with a 95 % t-interval over seeds. Round by round,
the default pick is paired with every other method the same way (the target "ahead of MC dropout at every round").
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import integrate, stats

from qunet.config import SelectionConfig

from qunet_bench.data import Case


def aubc(annotated: Sequence[int], dice: Sequence[float]) -> float:
    x, y = np.asarray(annotated, float), np.asarray(dice, float)
    if len(x) < 2 or x[-1] == x[0]:
        return float(y[-1]) if len(y) else float("nan")
    return float(integrate.trapezoid(y, x) / (x[-1] - x[0]))


def _by(results: list, method: str, seed: int) -> list:
    return sorted((r for r in results if r.method == method and r.seed == seed), key=lambda r: r.round)


def per_seed(results: list, key: str = "dice") -> dict[str, dict[int, dict[str, float]]]:
    """method -> seed -> {aubc, final}."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for method in dict.fromkeys(r.method for r in results):
        for seed in sorted({r.seed for r in results if r.method == method}):
            runs = _by(results, method, seed)
            out.setdefault(method, {})[seed] = {
                "aubc": aubc([r.annotated for r in runs], [getattr(r, key) for r in runs]),
                "final": getattr(runs[-1], key),
            }
    return out


def paired(values: dict[int, float], reference: dict[int, float]) -> tuple[float, float, float]:
    """Mean of per-seed differences and its 95 % t-interval (NaN interval with one seed)."""
    d = np.array([values[s] - reference[s] for s in values if s in reference])
    if len(d) == 0:
        return float("nan"), float("nan"), float("nan")
    if len(d) == 1:
        return float(d[0]), float("nan"), float("nan")
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def mean_sd(values: Sequence[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0:.3f}"


def difference(mean: float, lo: float, hi: float) -> str:
    return f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"


BASELINES = ("random", "interval")  # the methods the targets name: every other method is paired with each one run
DEFAULT = SelectionConfig().pick  # the app's default pick: every other method is paired with it too


def table(results: list, key: str = "dice") -> str:
    seeds = per_seed(results, key)
    baselines = [b for b in (DEFAULT, *BASELINES) if b in seeds]
    head = [
        "method",
        "AUBC",
        "final Dice",
        *(f"{k} - {b} [95 % CI]" for b in baselines for k in ("AUBC", "final")),
        "lesion slices annotated",
        "filled",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, by_seed in seeds.items():
        row = [method]
        for k in ("aubc", "final"):
            row.append(mean_sd([s[k] for s in by_seed.values()]))
        for b in baselines:
            for k in ("aubc", "final"):
                if method == b:
                    row.append("–")
                    continue
                row.append(
                    difference(*paired({s: v[k] for s, v in by_seed.items()}, {s: v[k] for s, v in seeds[b].items()}))
                )
        last = [_by(results, method, s)[-1] for s in by_seed]
        row.append(f"{np.mean([r.lesion_annotated for r in last]):.1f} of {last[0].annotated}")
        row.append(str(sum(r.filled for r in results if r.method == method)))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def rounds_table(results: list, key: str = "dice") -> str:
    """Dice after each round (mean ± SD over seeds), the default pick minus each other method per seed [95 % CI],
    and the mean seconds per round (training, scoring and Dice: MC dropout's extra passes show here)."""
    rounds = sorted({r.round for r in results})
    lines = [
        "| method | "
        + " | ".join(f"round {n}: Dice; `{DEFAULT}` - method [95 % CI]" for n in rounds)
        + " | seconds per round |",
        "|" + "---|" * (len(rounds) + 2),
    ]
    for method in dict.fromkeys(r.method for r in results):
        row = [method]
        for n in rounds:
            mine = {r.seed: getattr(r, key) for r in results if r.method == method and r.round == n}
            cell = mean_sd(list(mine.values()))
            theirs = {r.seed: getattr(r, key) for r in results if r.method == DEFAULT and r.round == n}
            if method != DEFAULT and theirs:
                cell += "; " + difference(*paired(theirs, mine))
            row.append(cell)
        row.append(f"{np.mean([r.seconds for r in results if r.method == method]):.0f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(results: list, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, name in zip(
        axes, ("dice", "dice_lesion_slices"), ("all unannotated slices", "unannotated lesion slices")
    ):
        for method in dict.fromkeys(r.method for r in results):
            rounds = sorted({r.round for r in results if r.method == method})
            x = [np.mean([r.annotated for r in results if r.method == method and r.round == n]) for n in rounds]
            ys = [[getattr(r, key) for r in results if r.method == method and r.round == n] for n in rounds]
            ax.errorbar(
                x,
                [np.mean(y) for y in ys],
                [np.std(y) for y in ys],
                marker="o",
                capsize=3,
                label=method,
                linestyle="--" if method == "lesion-random" else "-",
            )
        ax.set_xlabel("annotated slices")
        ax.set_ylabel(f"voxel Dice, {name}")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results: list, cases: Sequence[Case], out: Path, title: str, commands: Sequence[str]) -> str:
    total = sum(c.depth for c in cases)
    text = "\n".join(
        [
            f"# {title}",
            "",
            *(f"Command: `{c}`" for c in commands if c),
            "",
            f"Stacks: {', '.join(f'{c.name} ({c.depth} slices, lesion in {len(c.lesion_slices)})' for c in cases)}; "
            f"{total} slices. Seeds: {len({r.seed for r in results})}.",
            "",
            "Voxel Dice on every slice not annotated yet, after each round; mean ± SD over seeds. `lesion-random` "
            "reads "
            "the ground truth (a reference, not a method an annotation tool can use).",
            "",
            "## All unannotated slices",
            "",
            table(results),
            "",
            "## Unannotated slices holding lesion",
            "",
            table(results, "dice_lesion_slices"),
            "",
            "## Each round, all unannotated slices",
            "",
            rounds_table(results),
            "",
        ]
    )
    (out / "table.md").write_text(text)
    plot(results, out / "rounds.png", title)
    return text
