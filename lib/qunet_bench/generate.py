"""`python -m qunet generate`: one benchmark cohort written to a folder (qunet_bench.cohorts, qunet_bench.hybrid)."""

from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from qunet_bench.cohorts import COHORTS, prevalence_stack, summarize
from qunet_bench.hybrid import write_hybrids
from qunet_bench.synthetic import KINDS, write_dataset


def write_cohort(
    out_dir: str | Path,
    cohort: str = "default",
    kinds: Sequence[str] = KINDS,
    count: int = 2,
    seed: int = 0,
    shape: tuple[int, int, int] = (128, 128, 32),
    source: str | Path | None = None,
    stacks: Sequence[str] | None = None,
) -> dict:
    """Write one cohort (images in out_dir, masks in out_dir/ground-truth/); return what was written.

    `count` is per kind for the synthetic cohorts and per source stack for `hybrid`, which reads every stack
    of `source` with a same-named mask in `source`/ground-truth/ (or only the `stacks` named)."""
    if cohort not in COHORTS:
        raise ValueError(f"unknown cohort {cohort!r}; allowed: {', '.join(COHORTS)}")
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    if (cohort == "hybrid") != (source is not None):
        raise ValueError("--from (a folder of scans with masks) goes with --cohort hybrid, and only with it")
    if stacks and cohort != "hybrid":
        raise ValueError("--stacks selects source stacks of --cohort hybrid")
    if cohort == "hybrid":
        written, summary = write_hybrids(source, out_dir, count, seed, stacks)
    else:
        if cohort == "prevalence":
            written = write_dataset(out_dir, kinds, count, seed, shape, prevalence_stack, "-p")
        else:
            written = write_dataset(out_dir, kinds, count, seed, shape)
        summary = [summarize(p.name, np.asarray(nib.load(p.parent / "ground-truth" / p.name).dataobj)) for p in written]
    return {"cohort": cohort, "written": [str(p) for p in written], "summary": summary}
