"""The learning-curve sub-command on a tiny generated cohort: one point per count and seed, disjoint train and test."""

import csv
import json

from qunet.__main__ import main
from qunet_bench.generate import write_cohort


def test_curve_writes_a_point_per_count_and_seed(tmp_path):
    data = tmp_path / "data"
    write_cohort(data, count=1, seed=1, shape=(40, 40, 10))  # one OCT-like and one CT-like stack, masks beside
    out = tmp_path / "out"
    assert (
        main(
            [
                "curve",
                "--data",
                str(data),
                "--counts",
                "3",
                "6",
                "--seeds",
                "2",
                "--features",
                "4,4,8,8,16,4",
                "--patch-size",
                "32",
                "--max-epochs",
                "1",
                "--steps-per-epoch",
                "2",
                "--batch-size",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = list(csv.DictReader(open(out / "points.csv")))
    pooled = [r for r in rows if r["stack"] == "all"]
    assert sorted((int(r["count"]), int(r["seed"])) for r in pooled) == [(3, 0), (3, 1), (6, 0), (6, 1)]
    for r in rows:
        if r["stack"] != "all":
            assert int(r["test_slices"]) == 10 - len(r["annotated"].split())  # every slice not trained on is tested
            assert 0.0 <= float(r["dice"]) <= 1.0
    for count in (3, 6):  # the annotated slices of a point add up to its count
        assert all(
            sum(
                len(r["annotated"].split())
                for r in rows
                if r["stack"] != "all" and int(r["count"]) == count and r["seed"] == seed
            )
            == count
            for seed in ("0", "1")
        )
    assert "| 3 |" in (out / "table.md").read_text() and (out / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "settings.json").read_text())["train"]["steps_per_epoch"] == 2
