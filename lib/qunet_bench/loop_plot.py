"""The live loop's figure: Dice on unannotated slices against annotated slices, one fixed colour per method."""

from pathlib import Path

import numpy as np

COLOURS = {"app": "#1f77b4", "random": "#7f7f7f", "interval": "#ff7f0e"}  # the same in every plot of the project
NAMES = {"app": "the app's Next sample", "random": "random slices", "interval": "evenly spaced slices"}


def plot(results: list[dict], path: Path, title: str, key: str = "dice") -> None:
    """Mean over seeds (lines), each seed (dots); the app's pick drawn last, on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for method in sorted({r["method"] for r in results}, key=lambda m: m == "app"):
        runs = [r for r in results if r["method"] == method]
        counts = sorted({r["annotated"] for r in runs})
        ys = [np.mean([r[key] for r in runs if r["annotated"] == n]) for n in counts]
        colour = COLOURS.get(method, "k")
        ax.plot(counts, ys, "-o", color=colour, label=NAMES.get(method, method), zorder=3 if method == "app" else 2)
        ax.scatter([r["annotated"] for r in runs], [r[key] for r in runs], s=10, color=colour, alpha=0.4)
    ax.set_xlabel("annotated slices (all volumes)")
    ax.set_ylabel("Dice, unannotated slices" if key == "dice" else "Dice, unannotated lesion slices")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="lines: mean over seeds; dots: each seed", title_fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
