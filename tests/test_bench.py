"""The speed benchmark (qunet.experiments.bench) at tiny sizes: it runs, and reports positive figures in the right places.

The figures of a --quick run mean nothing; no test asserts a speed."""

import json

import numpy as np
import pytest
import torch

from qunet.experiments import bench
from qunet.__main__ import main
from qunet.disagreement import Q_TOLERANCE, _q_bounds, disagreement_scores, prepare
from qunet.network import build_network

TINY = (4, 4, 8, 8, 16, 4)


def test_quick_bench_writes_every_figure(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--only", "matmul", "scoring", "quality", "memory", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["quick"] is True and result["machine"]["cores"] >= 1
    assert result["matmul"]["gflops"] > 0
    s = result["scoring"]
    for key in ("slices_per_s", "gflops", "gflop_per_slice", "plain_loop_slices_per_s", "speedup_vs_plain_loop",
                "fraction_of_matmul"):
        assert s[key] > 0, key
    assert s["gflop_per_slice"] == pytest.approx(bench.forward_flops(build_network(TINY), 32) / 1e9, abs=0.01)
    assert s["bf16"]["safe_max_abs_q_difference"] <= Q_TOLERANCE
    assert result["quality"]["slices_per_s"] > 0 and result["quality"]["shape"] == [64, 64, 8]
    runs = result["memory"]["runs"]
    assert {(r["kind"], r["shape"][2]) for r in runs} == {(k, d) for k in ("quality", "disagreement") for d in (4, 12)}
    assert all(r["peak_mb"] > 0 and r["extra_mb"] >= 0 for r in runs)
    assert set(result["targets"]) >= {"scoring >= 60% of matmul GFLOP/s", "quality >= 50 slices/s at 512x512"}
    assert all(isinstance(t["met"], bool) for t in result["targets"].values())
    printed = capsys.readouterr().out
    assert "matmul fp32" in printed and "quality metrics" in printed and str(out) in printed


def test_forward_flops_counts_a_known_convolution():
    conv = torch.nn.Conv2d(1, 2, 3, padding=1, bias=False)
    assert bench.forward_flops(conv, 8) == 2 * 2 * 9 * 8 * 8  # 2 FLOPs per multiply-add


def test_next_sample_latency_against_a_live_server(tmp_path):
    result = bench.next_sample_bench(volumes=3, requests_count=2, workdir=str(tmp_path))
    assert result["scoring"]["qunet_quality"]["scored"] == 3  # by the app's scoring classes
    assert result["scoring"]["qunet_disagreement"]["scored"] == 3
    assert result["quality_rescoring"]["skipped"] == 3  # and the server agrees they are current
    assert result["disagreement_rescoring"]["skipped"] == 3
    assert result["scoring"]["in_process"]["strategy_scan_ms"] > 0
    assert result["initial_answer"]["phase"] == "initial"
    assert result["disagreement_answer"]["phase"] == "disagreement" and result["disagreement_answer"]["slices"]
    for phase in ("initial", "disagreement"):
        assert 0 < result[phase]["p50_ms"] <= result[phase]["p95_ms"] <= result[phase]["max_ms"]


def test_bf16_scores_stay_within_tolerance_of_fp32():
    torch.manual_seed(0)
    net = prepare(build_network(TINY), torch.device("cpu"))
    vol = np.random.default_rng(0).random((40, 30, 9)).astype(np.float32)
    full = disagreement_scores(net, vol, 32, 3)
    half = disagreement_scores(net, vol, 32, 3, precision="bf16")
    assert np.nanmax(np.abs(full - half)) <= Q_TOLERANCE
    with pytest.raises(ValueError, match="precision"):
        disagreement_scores(net, vol, 32, 3, precision="fp8")


def test_q_bounds_widen_with_unsure_pixels():
    l3 = torch.tensor([[[[2.0, -0.05, -2.0, -2.0]]]])
    l4 = torch.tensor([[[[2.0, 2.0, -0.05, -2.0]]]])
    q, low, high = _q_bounds(l3, l4, 0.0)
    assert q.item() == pytest.approx(0.5) and low.item() == pytest.approx(0.5) and high.item() == pytest.approx(0.5)
    q, low, high = _q_bounds(l3, l4, 0.1)  # pixels 1 and 2 could flip
    assert low.item() < 0.5 < high.item() and high.item() <= 1
