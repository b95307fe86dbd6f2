"""The Table I experiment (qunet_bench.table1) on tiny synthetic stacks: bookkeeping, equal cost, outputs."""

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from qunet.__main__ import main
from qunet.config import TrainConfig
from qunet_bench.data import find_pairs, load_cases
from qunet_bench.table1 import ExperimentConfig, Runner
from qunet_bench.uncertainty import enable_dropout_only, epistemic_slice_scores
from qunet.network import build_network
from qunet_bench.synthetic import generate_stack

TINY = dict(
    patch_size=32,
    features=(4, 4, 8, 8, 16, 4),
    train=TrainConfig(max_epochs=1, steps_per_epoch=2, batch_size=2),
    seeds=2,
    mc_passes=2,
    max_initial=2,
)


def write(array: np.ndarray, path: Path) -> None:
    nib.save(nib.Nifti1Image(array, np.diag([0.7, 0.7, 5.0, 1.0])), path)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("exp")
    (root / "ground-truth").mkdir()
    for name, kind, seed, depth in (("a", "ct", 1, 10), ("b", "oct", 2, 7)):
        stack = generate_stack(kind, seed, (32, 32, depth))
        write(stack.image.astype(np.float32), root / f"{name}.nii.gz")
        write(stack.label.astype(np.uint8), root / "ground-truth" / f"{name}.nii.gz")
    return root


def test_label_discovery(data, tmp_path):
    pairs = find_pairs(data)
    assert [(p.name, l.parent.name) for p, l in pairs] == [("a.nii.gz", "ground-truth"), ("b.nii.gz", "ground-truth")]
    assert [p.name for p, _ in find_pairs(data, include=["b*"])] == ["b.nii.gz"]
    (tmp_path / "x_image.nii.gz").write_bytes((data / "a.nii.gz").read_bytes())
    (tmp_path / "x_label.nii.gz").write_bytes((data / "ground-truth" / "a.nii.gz").read_bytes())
    assert find_pairs(tmp_path, tmp_path, label_replace=("_image", "_label")) == [
        (tmp_path / "x_image.nii.gz", tmp_path / "x_label.nii.gz")
    ]
    (tmp_path / "ground-truth").mkdir()
    with pytest.raises(ValueError, match="no label"):
        find_pairs(tmp_path)


def test_config_rejects_bad_settings():
    for bad in (
        dict(features=(4, 4)),
        dict(patch_size=20),
        dict(methods=("nope",)),
        dict(random_fraction=1.5),
        dict(mc_score="max"),
        dict(s0_roi="x"),
    ):
        with pytest.raises(ValueError):
            ExperimentConfig(**bad)


def test_runs_are_disjoint_equal_cost_and_reported(data, tmp_path, capsys):
    config = ExperimentConfig(**TINY, q0=1.01, sm_limit=2)  # q0 > 1 flags every slice: Sm = the 2 lowest-Q per stack
    cases = load_cases(find_pairs(data))
    runner = Runner(cases, config)
    results = [r for seed in (0, 1) for r in runner.run_seed(seed)]
    depth = {c.name: c.depth for c in cases}
    s0 = runner.s0
    assert all(s0.values()), "every stack gets an S0"
    for r in results:
        for name in depth:  # train and test are disjoint and cover the stack
            assert not set(r.train[name]) & set(r.test[name])
            assert sorted(r.train[name] + r.test[name]) == list(range(depth[name]))
    by = {(r.seed, r.method): r for r in results}
    for seed in (0, 1):
        qunet = by[seed, "qunet"]
        for name in depth:
            assert set(s0[name]) <= set(qunet.train[name])
            assert len(qunet.train[name]) == len(s0[name]) + 2  # |S0| + |Sm|
            assert by[seed, "s0"].train[name] == s0[name]  # S0 in its rank order
            for other in ("random-equal", "mcdropout-equal"):  # equal annotation cost, stack by stack
                assert len(by[seed, other].train[name]) == len(qunet.train[name])
            assert set(s0[name]) <= set(by[seed, "mcdropout-equal"].train[name])
            assert len(by[seed, "random25-unet"].train[name]) == round(0.25 * depth[name])
        assert 0 <= qunet.pooled["dice"] <= 1 and 0 <= qunet.pooled["dice_voxels"] <= 1

    # the CLI writes the same kinds of results
    out = tmp_path / "out"
    argv = [
        "experiment",
        "--data",
        str(data),
        "--out",
        str(out),
        "--seeds",
        "2",
        "--patch-size",
        "32",
        "--features",
        "4,4,8,8,16,4",
        "--max-epochs",
        "1",
        "--steps-per-epoch",
        "1",
        "--batch-size",
        "2",
        "--mc-passes",
        "2",
        "--max-initial",
        "2",
        "--sm-limit",
        "1",
        "--q0",
        "1.01",
        "--extra-fractions",
        "0.5",
        "--no-progress",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| Method | Model | #train/#test | #train with lesion | Pr | Re | J | D | Acc | D vox |" in printed
    for name in ("table.md", "table.csv", "runs.csv", "dice_vs_fraction.png", "settings.json"):
        assert (out / name).stat().st_size > 0
    assert (out / "dice_vs_fraction.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(open(out / "table.csv")))
    methods = [
        "random25-unet",
        "random25-unetpp",
        "random-unetpp@0.5",
        "s0",
        "qunet",
        "random-equal-stage1",
        "random-equal",
        "mcdropout-stage1",
        "mcdropout-equal",
    ]
    assert [r["method"] for r in rows if r["stack"] == "all"] == methods
    assert {r["stack"] for r in rows} == {"all", "a", "b"}
    for r in rows:
        assert {
            "n_train",
            "n_test",
            "precision",
            "recall",
            "jaccard",
            "dice",
            "accuracy",
            "dice_voxels",
            "dice_sd",
        } <= set(r)
        assert 0 <= float(r["dice"]) <= 1 and r["seeds"] == "2"
        assert 0 <= float(r["n_train_lesion"]) <= float(r["n_train"])
        assert float(r["n_train"]) + float(r["n_test"]) == (
            17 if r["stack"] == "all" else {"a": 10, "b": 7}[r["stack"]]
        )
    qunet = next(r for r in rows if r["method"] == "qunet" and r["stack"] == "all")
    s0_all = next(r for r in rows if r["method"] == "s0" and r["stack"] == "all")
    assert float(qunet["n_train"]) == float(s0_all["n_train"]) + 2  # one Sm slice in each of the two stacks
    runs = list(csv.DictReader(open(out / "runs.csv")))
    assert len(runs) == 2 * len(methods) * 3  # seeds x methods x (all + 2 stacks)


def test_epistemic_scores_match_monai_label():
    from types import SimpleNamespace

    from monailabel.tasks.scoring.epistemic_v2 import EpistemicScoring

    rng = np.random.default_rng(0)
    probs = rng.random((5, 3, 1, 8, 8)).astype(np.float32)  # passes, slices, channels, H, W
    ours = epistemic_slice_scores(probs)
    fake = SimpleNamespace(dimension=2)
    theirs = [float(np.nanmean(EpistemicScoring.entropy_volume(fake, probs[:, i].copy()))) for i in range(3)]
    assert np.allclose(ours, theirs, rtol=1e-5)
    confident = np.stack([np.full((1, 8, 8), 0.999, np.float32)] * 5)[:, None]
    unsure = rng.random((5, 1, 1, 8, 8)).astype(np.float32) * 0.6 + 0.2
    both = np.concatenate([confident, unsure], axis=1)
    for use_variance in (False, True):
        s = epistemic_slice_scores(both, use_variance)
        assert s[1] > s[0]


def test_mc_dropout_keeps_only_dropout_stochastic():
    net = enable_dropout_only(build_network((4, 4, 8, 8, 16, 4), dropout=0.3))
    assert all(m.training == isinstance(m, torch.nn.Dropout) for m in net.modules() if not list(m.children()))
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        assert not torch.equal(net(x)[-1], net(x)[-1])
