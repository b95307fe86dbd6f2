"""The live-loop benchmark's summary (qunet_bench.loop_bench): AUBC per method and seed, and the app's pick
against each baseline paired by seed, with a t interval over seeds."""

import json
import math

import pytest
from scipy import stats

from qunet_bench.loop_bench import summary


def rounds(method: str, seed: int, dice: list[float]) -> list[dict]:
    return [{"method": method, "seed": seed, "round": r + 1, "dice": d} for r, d in enumerate(dice)]


def test_aubc_and_paired_differences():
    results = (
        rounds("app", 0, [0.2, 0.4])
        + rounds("app", 1, [0.4, 0.6])
        + rounds("random", 0, [0.1, 0.1])
        + rounds("random", 1, [0.1, 0.3])
        + rounds("interval", 0, [0.3, 0.5])
    )
    out = summary(results)
    assert out["aubc"]["app"]["seeds"] == {0: pytest.approx(0.3), 1: pytest.approx(0.5)}
    assert out["aubc"]["app"]["mean"] == pytest.approx(0.4)
    differences = [0.3 - 0.1, 0.5 - 0.2]
    assert out["app_minus_random"]["mean"] == pytest.approx(0.25)
    assert out["app_minus_random"]["interval95"] == pytest.approx(stats.t.ppf(0.975, 1) * stats.sem(differences))
    assert out["app_minus_interval"]["seeds"] == 1 and out["app_minus_interval"]["mean"] == pytest.approx(-0.1)
    assert math.isnan(out["app_minus_interval"]["interval95"])  # one seed: no interval
    json.dumps(out)  # written to --out as it goes


def test_plot_writes_a_figure_of_every_method(tmp_path):
    from qunet_bench.loop_plot import plot

    rows = [{"method": m, "seed": s, "annotated": n, "dice": d}
            for m, d in (("app", 0.5), ("random", 0.3)) for s in (0, 1) for n in (4, 8)]
    plot(rows, tmp_path / "loop.png", "test")
    assert (tmp_path / "loop.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
