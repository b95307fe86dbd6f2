"""The memory part of `python -m qunet bench`: peak resident memory beyond the loaded volume while scoring
512x512xD volumes, each depth in a fresh subprocess (Linux VmHWM, reset after the volume is built)."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _hwm_mb() -> float:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def _rss_mb() -> float:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def memory_probe(kind: str, shape: tuple[int, int, int], patch_size: int, features: tuple[int, ...]) -> dict:
    """Run in a fresh process: build the volume, reset the peak, score it, report the peak beyond the start."""
    import torch

    from qunet.disagreement import disagreement_scores
    from qunet.network import build_network, prepare
    from qunet.quality import slice_quality

    torch.manual_seed(0)
    network = prepare(build_network(features), torch.device("cpu"))
    volume = np.empty(shape, np.float32)
    rng = np.random.default_rng(0)
    for k in range(shape[2]):  # slice by slice: no temporary the size of the volume
        volume[:, :, k] = rng.random(shape[:2], dtype=np.float32) * 1000
    if kind == "disagreement":  # warm up once so that one-off allocations (kernels, thread pools) are not counted
        disagreement_scores(network, volume[:, :, :4], patch_size)
    else:
        slice_quality(volume[:, :, :4])
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start = _rss_mb()
    t = time.perf_counter()
    if kind == "disagreement":
        disagreement_scores(network, volume, patch_size)
    else:
        slice_quality(volume)
    return {
        "kind": kind,
        "shape": list(shape),
        "volume_mb": round(volume.nbytes / 2**20, 1),
        "rss_before_mb": round(start, 1),
        "peak_mb": round(_hwm_mb(), 1),
        "extra_mb": round(_hwm_mb() - start, 1),
        "seconds": round(time.perf_counter() - t, 2),
    }


def memory_bench(
    depths=(100, 600), size: int = 512, patch_size: int = 96, features=(8, 16, 32, 64, 128, 8), in_process: bool = False
) -> dict:
    """Peak memory beyond the volume while scoring (quality and disagreement), per depth, each in a fresh process
    (`in_process`: in this one, for quick checks)."""
    if not Path("/proc/self/clear_refs").exists():
        return {"skipped": "needs Linux /proc to reset the peak"}
    out = {"patch_size": patch_size, "features": list(features), "runs": []}
    for kind in ("quality", "disagreement"):
        for depth in depths:
            if in_process:
                out["runs"].append(memory_probe(kind, (size, size, depth), patch_size, tuple(features)))
                continue
            code = (
                f"import json; from qunet_bench.memory_bench import memory_probe; print(json.dumps(memory_probe("
                f"{kind!r}, ({size}, {size}, {depth}), {patch_size}, {tuple(features)!r})))"
            )
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
            if r.returncode:
                raise RuntimeError(f"memory probe failed: {r.stderr[-2000:]}")
            out["runs"].append(json.loads(r.stdout.strip().splitlines()[-1]))
    return out
