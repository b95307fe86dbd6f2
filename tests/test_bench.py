"""The speed benchmark (qunet_bench.bench) at tiny sizes: it runs, and reports positive figures in the right places.

The figures of a --quick run mean nothing; no test asserts a speed."""

import json

import pytest
import torch

from qunet.__main__ import main
from qunet_bench import bench, live_bench
from qunet.network import build_network

TINY = (4, 4, 8, 8, 16, 4)


def test_quick_bench_writes_every_figure(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert (
        main(
            [
                "bench",
                "--quick",
                "--only",
                "matmul",
                "scoring",
                "training",
                "quality",
                "memory",
                "scale",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["quick"] is True and result["machine"]["cores"] >= 1
    assert result["matmul"]["gflops"] > 0
    s = result["scoring"]
    for key in ("slices_per_s", "gflops", "gflop_per_slice", "fraction_of_matmul"):
        assert s[key] > 0, key
    assert s["windows_per_slice"] == 4  # 48 px slices, 32 px windows, stride 24: 2 x 2
    assert s["gflop_per_slice"] == pytest.approx(4 * bench.forward_flops(build_network(TINY), 32) / 1e9, rel=1e-3)
    assert result["quality"]["slices_per_s"] > 0 and result["quality"]["shape"] == [64, 64, 8]
    runs = result["memory"]["runs"]
    assert {(r["kind"], r["shape"][2]) for r in runs} == {(k, d) for k in ("quality", "disagreement") for d in (4, 12)}
    assert all(r["peak_mb"] > 0 and r["extra_mb"] >= 0 for r in runs)
    scale = result["scale"]["runs"]
    assert [r["volumes"] for r in scale] == [50, 200] and all(r["records_mb"] > 0 for r in scale)
    assert all(0 < r["next_sample_in_process"]["p50_ms"] <= r["next_sample_in_process"]["p95_ms"] for r in scale)
    assert set(result["targets"]) >= {"scoring >= 60% of matmul GFLOP/s", "quality >= 50 slices/s at 512x512"}
    assert all(isinstance(t["met"], bool) for t in result["targets"].values())
    printed = capsys.readouterr().out
    assert (
        "matmul fp32" in printed and "quality metrics" in printed and "200 volumes" in printed and str(out) in printed
    )


def test_forward_flops_counts_a_known_convolution():
    conv = torch.nn.Conv2d(1, 2, 3, padding=1, bias=False)
    assert bench.forward_flops(conv, 8) == 2 * 2 * 9 * 8 * 8  # 2 FLOPs per multiply-add


def test_next_sample_latency_against_a_live_server(tmp_path):
    result = live_bench.next_sample_bench(volumes=3, requests_count=4, workdir=str(tmp_path), label_every=2)
    assert result["auto_update_scoring"] is True  # the server's defaults
    assert 0 < result["unscored_start_to_first_answer_seconds"] <= result["quality_scoring_seconds"]
    assert result["disagreement_scoring_seconds"] > 0 and result["startup_to_first_answer_seconds"] > 0
    assert result["initial"]["labels_saved"] == result["disagreement"]["labels_saved"] == 2
    assert result["initial_answer"]["phase"] == "initial"
    assert result["disagreement_answer"]["phase"] == "disagreement" and result["disagreement_answer"]["slices"]
    for phase in ("initial", "disagreement"):
        assert 0 < result[phase]["p50_ms"] <= result[phase]["p95_ms"] <= result[phase]["max_ms"]


def test_windows_per_slice_as_monai_places_them():
    assert bench.windows_per_slice(96, 96) == 1 and bench.windows_per_slice(40, 96) == 1
    assert bench.windows_per_slice(512, 96) == 7**2  # stride 72: ceil((512 - 96) / 72) + 1 = 7 per axis


def test_quick_ranks_bench_leaves_nothing_in_the_temporary_folder(tmp_path, system_tmp):
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--only", "ranks", "--out", str(out)]) == 0
    ranks = json.loads(out.read_text())["ranks"]
    assert ranks["ranks"] == 2 and ranks["speedup"] > 0
    left = [p.name for p in system_tmp.iterdir() if not p.name.startswith("torchinductor_")]  # torch's shared cache
    assert not left, f"left in the temporary folder: {left}"


def test_training_bench_counts_a_step_against_matmul():
    t = bench.training_bench((4, 4, 8, 8, 16, 4), 32, batch=2, steps=1, rounds=1)
    forward = bench.forward_flops(build_network((4, 4, 8, 8, 16, 4)), 32) * 2
    assert t["gflop_per_update"] * 1e9 > 2 * forward  # backward costs more than the forward it follows
    assert t["seconds_per_update"] > 0 and 0 < t["fraction_of_matmul"] < 1.5
