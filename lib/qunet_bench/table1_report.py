"""Reporting of the Table I experiment (qunet_bench.table1): tables, CSV files, the plot, settings."""

import csv
import json
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from qunet.metrics import METRICS
from qunet.network import default_device

from qunet_bench.data import Case

METRIC_NAMES = tuple(METRICS)  # precision, recall, jaccard, dice, accuracy
TABLE_COLUMNS = {
    "precision": "Pr",
    "recall": "Re",
    "jaccard": "J",
    "dice": "D",
    "accuracy": "Acc",
    "dice_voxels": "D vox",
}
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
            row = {
                "stack": stack,
                "method": method,
                "label": label,
                "model": model,
                "seeds": len(runs),
                "n_train": float(np.mean(n_train)),
                "n_train_sd": _sd(n_train),
                "n_test": float(np.mean(n_test)),
                "n_test_sd": _sd(n_test),
                "n_train_lesion": float(np.mean(n_lesion)),
                "fraction": float(np.mean(n_train)) / depth,
            }
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
        cells = [
            r["label"],
            r["model"],
            f"{_count(r['n_train'], r['n_train_sd'])}/{_count(r['n_test'], r['n_test_sd'])}",
            f"{r['n_train_lesion']:.1f}",
        ]
        cells += [
            "–" if r[k] != r[k] else f"{r[k]:.2f} ± {r[k + '_sd']:.2f}" for k in TABLE_COLUMNS
        ]  # – : no test slice
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
            rows.append(
                {
                    "seed": r.seed,
                    "method": r.method,
                    "stack": stack,
                    "n_train": n_train,
                    "n_test": n_test,
                    "n_train_lesion": n_lesion,
                    **{k: round(values[k], 5) for k in TABLE_COLUMNS},
                    "seconds": r.seconds,
                    "train_slices": train_slices,
                }
            )
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Dice (per-slice mean, and voxel Dice) against the fraction of slices annotated, mean +- SD over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    allrows = {r["method"]: r for r in rows if r["stack"] == "all"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {
        "qunet": ("s0", "tab:red", "o", "QU-net++ (S0 → S0+Sm)"),
        "random-equal": ("random-equal-stage1", "tab:gray", "s", "random, equal count"),
        "mcdropout-equal": ("mcdropout-stage1", "tab:blue", "^", "MC dropout, equal count"),
    }
    for ax, key, name in zip(axes, ("dice", "dice_voxels"), ("Dice (mean over test slices)", "Dice (all test voxels)")):
        randoms = sorted(
            (r for m, r in allrows.items() if m == "random25-unetpp" or m.startswith("random-unetpp@")),
            key=lambda r: r["fraction"],
        )
        if randoms:
            ax.errorbar(
                [r["fraction"] for r in randoms],
                [r[key] for r in randoms],
                [r[key + "_sd"] for r in randoms],
                color="tab:green",
                marker="D",
                capsize=3,
                label="random U-net++",
            )
        if "random25-unet" in allrows:
            r = allrows["random25-unet"]
            ax.errorbar(
                [r["fraction"]],
                [r[key]],
                [r[key + "_sd"]],
                color="tab:olive",
                marker="v",
                capsize=3,
                linestyle="none",
                label="random U-net",
            )
        for method, (first, color, marker, label) in styles.items():
            pts = [allrows[m] for m in (first, method) if m in allrows]
            if method in allrows:
                ax.errorbar(
                    [p["fraction"] for p in pts],
                    [p[key] for p in pts],
                    [p[key + "_sd"] for p in pts],
                    color=color,
                    marker=marker,
                    capsize=3,
                    label=label,
                    alpha=0.9,
                )
        ax.set_xlabel("fraction of slices annotated")
        ax.set_ylabel(name)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(
    results: list[Result],
    cases: list[Case],
    s0: dict[str, list[int]],
    config,
    out: Path,
    title: str,
    command: str,
    seconds: float,
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    rows = summarise(results, cases)
    sm = [r for r in results if r.method == "qunet"]
    depth = {c.name: c.depth for c in cases}
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()}
    lines = [
        f"# {title}",
        "",
        f"Command: `{command}`",
        "",
        "Stacks: "
        + "; ".join(f"{c.name} ({'x'.join(map(str, c.volume.shape))}, S0 {len(s0[c.name])})" for c in cases)
        + "; "
        f"{sum(depth.values())} slices. Seeds: {config.seeds}. Device: {_device_name(config)}. Run time: "
        f"{seconds / 60:.1f} min.",
        "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items() if k != "methods"),
        "",
        "Pooled over all stacks: metrics averaged over every test slice (the paper's per-image means; a slice with",
        "nothing predicted and nothing there scores 1), D vox = Dice over all test voxels together. Mean ± SD over "
        "seeds;",
        "each model is tested on the slices it was not trained on.",
        "",
        markdown_table(rows),
        "",
    ]
    if sm:
        counts = [r.n_train for r in sm]
        lines += [
            f"QU-net++ annotated {np.mean(counts):.1f} slices on average (min {min(counts)}, max {max(counts)}) "
            f"= {np.mean(counts) / sum(depth.values()) * 100:.1f}% of {sum(depth.values())}; "
            f"|S0| = {sum(len(v) for v in s0.values())}.",
            "",
        ]
    lines += ["Per stack (Dice, mean over seeds):", "", per_stack_dice_table(rows, cases), ""]
    text = "\n".join(lines)
    (out / "table.md").write_text(text)
    write_csv(out / "table.csv", rows)
    write_csv(out / "runs.csv", run_rows(results))
    plot(rows, out / "dice_vs_fraction.png", title)
    (out / "settings.json").write_text(
        json.dumps(
            {
                "command": command,
                "settings": settings,
                "seconds": round(seconds, 1),
                "device": _device_name(config),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "python": platform.python_version(),
                "stacks": {c.name: {"shape": list(c.volume.shape), "s0": s0[c.name]} for c in cases},
            },
            indent=1,
        )
    )
    return {
        "table": text,
        "rows": rows,
        "files": [str(out / n) for n in ("table.md", "table.csv", "runs.csv", "dice_vs_fraction.png", "settings.json")],
    }


def _device_name(config) -> str:
    device = torch.device(config.device) if config.device else default_device()
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
