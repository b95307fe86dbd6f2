"""Speed benchmark: `python -m qunet bench [--out bench.json]`.

Measures, in one run on this machine:

- `matmul`: the fp32 matrix-multiply rate (GFLOP/s) of torch on this machine, the yardstick;
- `scoring`: disagreement scoring (qunet.disagreement.disagreement_scores) of the default U-net++ at the
  default patch size on 512x512 slices at native resolution (sliding windows): slices/s and GFLOP/s (FLOPs
  counted by torch's FlopCounterMode), as a fraction of the matmul rate;
- `quality`: qunet.quality.slice_quality throughput on 512x512 slices;
- `next_sample`: POST /activelearning/qunet latency (p50, p95) from many clients, against a real
  `monailabel start_server` started with its defaults (auto-update scoring on), over N volumes the server scored
  (initial phase, no model; then disagreement phase, a small model), a label saved after every fifth answer;
- `memory`: peak resident memory beyond the loaded volume while scoring 512x512xD volumes of two depths, in
  fresh subprocesses (Linux VmHWM, reset after the volume is built).

Each figure is measured, never assumed; `targets` compares them with the issue's goals.
"""

import contextlib
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from qunet_bench.bench_report import render, targets
from qunet_bench.cli import recorded_command

# ----------------------------------------------------------------------------------------------- helpers


def _sig(x: float) -> float:
    """Four significant figures: tiny --quick figures must not round to zero."""
    return float(f"{x:.4g}")


def _best(fn, repeats: int) -> float:
    """Shortest wall time of `repeats` calls (after one warm-up): the least disturbed by other load."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def matmul_gflops(n: int = 2048, repeats: int = 5) -> dict:
    """fp32 torch.mm rate, the best of `repeats` runs of an n x n product."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    seconds = _best(lambda: torch.mm(a, b), repeats)
    return {"n": n, "seconds": _sig(seconds), "gflops": _sig(2 * n**3 / seconds / 1e9)}


# ----------------------------------------------------------------------------------------------- scoring


def forward_flops(network, size: int) -> float:
    """FLOPs of one forward pass over one size x size window (multiply-adds counted as two), by FlopCounterMode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        network(torch.zeros(1, 1, size, size))
    return float(counter.get_total_flops())


def windows_per_slice(size: int, patch: int) -> int:
    """Sliding windows over a size x size slice, as MONAI's inferer places them (qunet.disagreement.OVERLAP)."""
    from qunet.disagreement import OVERLAP

    step = max(int(patch * (1 - OVERLAP)), 1)
    per_axis = 1 if size <= patch else -(-(size - patch) // step) + 1
    return per_axis**2


def scoring_bench(
    features=None, patch_size: int | None = None, size: int = 512, slices: int = 8, rounds: int = 3, seed: int = 0
) -> dict:
    """disagreement_scores over `slices` slices of size x size at native resolution (sliding windows of the patch
    size), against the fp32 matmul rate measured in the same rounds (best time of each, interleaved: on a shared
    machine every figure comes from its least disturbed moment)."""
    import torch

    from qunet.config import DEFAULT_FEATURES, ModelConfig
    from qunet.disagreement import disagreement_scores
    from qunet.network import build_network, prepare

    features = tuple(features or DEFAULT_FEATURES)
    patch_size = patch_size or ModelConfig.patch_size
    torch.manual_seed(seed)
    network = prepare(build_network(features), torch.device("cpu"))
    flops = forward_flops(network, patch_size) * windows_per_slice(size, patch_size)
    volume = np.random.default_rng(seed).random((size, size, slices), dtype=np.float32)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    best = {"matmul": float("inf"), "scoring": float("inf")}
    disagreement_scores(network, volume[:, :, :1], patch_size)  # warm-up: kernel selection, allocation
    for _ in range(rounds):
        best["matmul"] = min(best["matmul"], _best(lambda: torch.mm(a, b), 2))
        t = time.perf_counter()
        disagreement_scores(network, volume, patch_size)
        best["scoring"] = min(best["scoring"], (time.perf_counter() - t) / slices)
    matmul = 2 * 2048**3 / best["matmul"] / 1e9
    return {
        "features": list(features),
        "patch_size": patch_size,
        "slice_size": size,
        "slices": slices,
        "rounds": rounds,
        "windows_per_slice": windows_per_slice(size, patch_size),
        "gflop_per_slice": _sig(flops / 1e9),
        "slices_per_s": _sig(1 / best["scoring"]),
        "gflops": _sig(flops / best["scoring"] / 1e9),
        "matmul_gflops_same_rounds": _sig(matmul),
        "fraction_of_matmul": _sig(flops / best["scoring"] / 1e9 / matmul),
    }


def training_bench(
    features=None, patch_size: int | None = None, batch: int = 8, steps: int = 5, rounds: int = 3
) -> dict:
    """One training update of the recipe (forward and backward of a batch, the loss, AdamW) on random patches: its
    time and its FLOPs (forward and backward, counted by FlopCounterMode) against the matmul rate of the same rounds.
    Patch sampling and augmentation are left out: this is the network's share of an update."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from qunet.config import DEFAULT_FEATURES, ModelConfig
    from qunet.network import DeepSupervisionDiceCE, build_network, channels_last

    features = tuple(features or DEFAULT_FEATURES)
    patch_size = patch_size or ModelConfig.patch_size
    torch.manual_seed(0)
    network = channels_last(build_network(features), torch.device("cpu")).train()
    optimiser, loss_fn = torch.optim.AdamW(network.parameters(), lr=3e-3), DeepSupervisionDiceCE()
    x = torch.randn(batch, 1, patch_size, patch_size).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch, 1, patch_size, patch_size) > 0.9).float()

    def update() -> None:
        optimiser.zero_grad(set_to_none=True)
        loss_fn(network(x), y).backward()
        optimiser.step()

    counter = FlopCounterMode(display=False)
    with counter:
        update()  # also the warm-up
    flops = float(counter.get_total_flops())
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    best = {"matmul": float("inf"), "update": float("inf")}
    for _ in range(rounds):
        best["matmul"] = min(best["matmul"], _best(lambda: torch.mm(a, b), 2))
        best["update"] = min(best["update"], _best(update, steps))
    matmul = 2 * 2048**3 / best["matmul"] / 1e9
    return {
        "features": list(features),
        "patch_size": patch_size,
        "batch": batch,
        "gflop_per_update": _sig(flops / 1e9),
        "seconds_per_update": _sig(best["update"]),
        "gflops": _sig(flops / best["update"] / 1e9),
        "matmul_gflops_same_rounds": _sig(matmul),
        "fraction_of_matmul": _sig(flops / best["update"] / 1e9 / matmul),
    }


# ----------------------------------------------------------------------------------------------- quality


def quality_volume(shape=(512, 512, 48), seed: int = 0) -> np.ndarray:
    """A CT-like synthetic stack of the given shape (qunet_bench.synthetic), as the app would load it (float32)."""
    from qunet_bench.synthetic import generate_stack

    return generate_stack("ct", seed, tuple(shape)).image.astype(np.float32)


def quality_bench(shape=(512, 512, 48), repeats: int = 3) -> dict:
    from qunet.config import QualityConfig
    from qunet.quality import slice_quality

    volume = quality_volume(shape)
    window = QualityConfig.median_window
    seconds = _best(lambda: slice_quality(volume, median_window=window), repeats)
    return {
        "shape": list(shape),
        "median_window": window,
        "seconds": round(seconds, 3),
        "slices_per_s": round(shape[2] / seconds, 1),
    }


# ----------------------------------------------------------------------------------------------- run

SECTIONS = ("matmul", "scoring", "training", "quality", "next_sample", "memory", "scale", "ranks")


def run(
    sections=SECTIONS, quick: bool = False, volumes: int = 1000, requests_count: int = 30, auto_scoring: bool = True
) -> dict:
    """All sections; `quick` shrinks every size (for tests: the figures then mean nothing)."""
    result: dict = {"machine": machine(), "quick": quick}
    if "matmul" in sections:
        result["matmul"] = matmul_gflops(256 if quick else 2048, 2 if quick else 5)
    if "scoring" in sections:
        result["scoring"] = scoring_bench((4, 4, 8, 8, 16, 4), 32, 48, slices=2, rounds=1) if quick else scoring_bench()
    if "training" in sections:
        result["training"] = training_bench((4, 4, 8, 8, 16, 4), 32, 2, 1, 1) if quick else training_bench()
    if "quality" in sections:
        result["quality"] = quality_bench((64, 64, 8), 1) if quick else quality_bench()
    if "next_sample" in sections:
        from qunet_bench.live_bench import next_sample_bench

        result["next_sample"] = next_sample_bench(volumes, requests_count, auto_scoring=auto_scoring)
    if "memory" in sections:
        from qunet_bench.memory_bench import memory_bench

        result["memory"] = (
            memory_bench((4, 12), 64, 32, (4, 4, 8, 8, 16, 4), in_process=True) if quick else memory_bench()
        )
    if "scale" in sections:
        from qunet_bench.scale_bench import scale_bench

        result["scale"] = scale_bench((50, 200), 8, 3) if quick else scale_bench()
    if "ranks" in sections:
        from qunet_bench.ranks_bench import ranks_bench

        result["ranks"] = ranks_bench(2, 2, (48, 48, 4), "4,4,8,8,16,4", 32) if quick else ranks_bench()
    result["targets"] = targets(result)
    return result


def add_arguments(p) -> None:
    p.add_argument("--out", default="bench.json", help="JSON file for the figures")
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="run only these parts")
    p.add_argument("--volumes", type=int, default=1000, help="scored volumes in the Next sample datastore")
    p.add_argument("--requests", type=int, default=30, help="Next sample requests timed per phase")
    p.add_argument(
        "--no-auto-scoring",
        dest="auto_scoring",
        action="store_false",
        help="turn MONAI Label's auto-update scoring off (on by default, as for users: after every Next "
        "sample the app asks whether a scoring run has work)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, to check that everything runs")


def main(args) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    result = run(tuple(args.only), args.quick, args.volumes, args.requests, args.auto_scoring)
    result["command"] = recorded_command("bench")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(render(result))
    print(f"written: {args.out}")
