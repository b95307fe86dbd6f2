"""The multi-round benchmark (qunet_bench.activelearning) on a tiny cohort: equal cost, bookkeeping, report."""

import json
import shlex
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.ndimage import binary_dilation

import qunet.policy
from qunet.__main__ import main
from qunet.config import ModelConfig, TrainConfig
from qunet_bench.activelearning import (
    METHODS,
    NEIGHBOUR_METHODS,
    Benchmark,
    LoopRun,
    RoundResult,
    RoundsConfig,
    pick_interval,
)
from qunet_bench.al_report import aubc, paired, rounds_table, table
from qunet_bench.data import Case, find_pairs, load_cases
from qunet_bench.diversity import appearance_picker
from qunet.neighbours import MARGIN
from qunet.network import build_network
from qunet_bench.synthetic import generate_stack

TINY = RoundsConfig(
    rounds=2,
    per_round=3,
    seeds=1,
    model=ModelConfig(features=(4, 4, 8, 8, 16, 4), patch_size=32),
    train=TrainConfig(max_epochs=1, steps_per_epoch=2, batch_size=2),
    mc_passes=2,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rounds")
    (root / "ground-truth").mkdir()
    for name, kind, seed, depth in (("a", "ct", 1, 10), ("b", "oct", 2, 8)):
        stack = generate_stack(kind, seed, (40, 40, depth))
        for folder, array in ((root, stack.image.astype(np.float32)), (root / "ground-truth", stack.label)):
            nib.save(nib.Nifti1Image(array, np.diag([0.7, 0.7, 5.0, 1.0])), folder / f"{name}.nii.gz")
    return root


def test_every_method_annotates_the_same_number_of_new_slices_each_round(data, monkeypatch):
    calls = []
    choose = qunet.policy.choose
    monkeypatch.setattr(qunet.policy, "choose", lambda *a, **k: calls.append(1) or choose(*a, **k))  # a counting spy
    bench = Benchmark(load_cases(find_pairs(data)), TINY, __import__("torch").device("cpu"))
    for method in METHODS:
        before = len(calls)
        results = bench.run(method, seed=0)
        assert [r.annotated for r in results] == [3, 6], method
        assert all(0 <= r.dice <= 1 and 0 <= r.lesion_annotated <= r.annotated for r in results)
        asks = method in qunet.policy.VARIANTS or method in NEIGHBOUR_METHODS
        assert (len(calls) > before) == asks, "the QU-net++ methods ask the app's policy"
    paper = bench.run("paper", seed=0)
    assert len(bench.initial["a"]) >= 3
    assert paper[0].picked == [("a", k) for k in bench.initial["a"][:3]]  # no model: S0 of the first volume, as served
    assert paper[0].filled == 0
    # `lesion` serves an eighth of a volume per answer (2 of a's 10 slices); the slices it served are held and count in
    # the volume order as annotated ones would after a submit, so the round's last slice comes from b
    lesion = bench.run("lesion", seed=0)
    assert [name for name, _ in lesion[0].picked] == ["a", "a", "b"]


def test_neighbour_methods_pick_as_lesion_and_train_also_on_the_lesion_slices_neighbours(data):
    import torch

    bench = Benchmark(load_cases(find_pairs(data)), TINY, torch.device("cpu"))
    a = bench.cases[0]
    k = a.lesion_slices[0]
    inside = [j for j in (k - 1, k + 1) if 0 <= j < a.depth]
    run = LoopRun(bench.cases, {"a": {k}, "b": set()}, {})
    assert [s.index for s in bench._training_set(run, "off")] == [k]
    copied = bench._training_set(run, "copy")
    assert [s.index for s in copied] == [k, *inside]
    assert all(np.array_equal(s.target, copied[0].target) for s in copied)
    assert [s.index for s in bench._training_set(run, "model")] == [k]  # no model yet: nothing to label with
    # the previous round's model labels them: its level-4 answer (here lesion everywhere) within reach of the annotation
    run.network = build_network(TINY.model.features).eval()
    with torch.no_grad():
        run.network.final_conv_0_4.weight.zero_()
        run.network.final_conv_0_4.bias.fill_(10.0)
    reach = binary_dilation(copied[0].target[0] > 0, iterations=MARGIN)
    labelled = bench._training_set(run, "model")[1:]
    assert [s.index for s in labelled] == inside
    assert all(np.array_equal(s.target[0] > 0, reach) for s in labelled)
    first = [bench.run(m, seed=0)[0] for m in ("lesion", "lesion+model")]
    assert first[0].picked == first[1].picked and first[0].dice == first[1].dice  # round 1: the same loop


def test_fixed_interval_spreads_over_the_slice_axis():
    case = Case("a", np.zeros((4, 4, 20), np.float32), np.zeros((4, 4, 20), bool))
    run = LoopRun([case], {"a": set()}, {})
    picks, _ = pick_interval(run, 3, np.random.default_rng(0))
    ks = sorted(k for _, k in picks)
    assert ks[0] >= 0 and min(np.diff(ks)) >= 5  # far apart, not neighbours
    run.annotated["a"].update(ks)
    more, _ = pick_interval(run, 3, np.random.default_rng(0))
    assert not {k for _, k in more} & set(ks)


def test_appearance_covers_each_look_of_a_stack_before_a_second_slice_of_one():
    # slices 0-9 one texture, 10-11 another: fixed-interval slices would start with 6 and 0, both of the first
    rng = np.random.default_rng(0)
    volume = np.repeat(rng.normal(0, 1, (32, 32, 1)), 12, axis=2).astype(np.float32)
    volume[:, :, 10:] = rng.normal(0, 1, (32, 32, 1)) * 3 + 5
    volume += rng.normal(0, 0.05, volume.shape).astype(np.float32)
    case = Case("a", volume, np.zeros(volume.shape, bool))
    run = LoopRun([case], {"a": set()}, {})
    picks, filled = appearance_picker([case])(run, 2, np.random.default_rng(0))
    assert filled == 0 and picks[0][1] < 10 <= picks[1][1]  # the most typical slice, then the other look
    run.annotated["a"].update(k for _, k in picks)
    more, _ = appearance_picker([case])(run, 3, np.random.default_rng(0))
    assert len({k for _, k in more}) == 3 and not {k for _, k in more} & run.annotated["a"]


def test_aubc_and_paired_intervals():
    assert aubc([0, 10], [0.2, 0.6]) == pytest.approx(0.4)
    assert aubc([2, 4, 8], [0.5, 0.5, 0.5]) == pytest.approx(0.5)
    mean, lo, hi = paired({0: 0.5, 1: 0.6, 2: 0.7}, {0: 0.4, 1: 0.5, 2: 0.6})
    assert mean == pytest.approx(0.1) and lo == pytest.approx(0.1) and hi == pytest.approx(0.1)  # no spread
    mean, lo, hi = paired({0: 0.5, 1: 0.9}, {0: 0.4, 1: 0.4})
    assert lo < mean < hi


def test_the_table_pairs_every_method_with_the_default_random_and_fixed_interval_slices():
    final = {"random": (0.4, 0.5), "interval": (0.5, 0.6), "lesion": (0.7, 0.7)}  # per seed, Dice after both rounds
    results = [
        RoundResult(method, seed, 1, 2, 1, 0, dice, dice, 1.0)
        for method, d in final.items()
        for seed, dice in enumerate(d)
    ]
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in table(results).splitlines()[2:]}
    header = table(results).splitlines()[0].split(" | ")
    lesion = dict(zip(header, rows["lesion"]))
    assert lesion["final - random [95 % CI]"].startswith("+0.250 [")  # (0.3 + 0.2) / 2
    assert lesion["final - interval [95 % CI]"].startswith("+0.150 [")  # (0.2 + 0.1) / 2
    assert dict(zip(header, rows["interval"]))["final - interval [95 % CI]"] == "–"
    assert dict(zip(header, rows["random"]))["final - lesion [95 % CI]"].startswith("-0.250 [")
    assert lesion["AUBC - lesion [95 % CI]"] == "–"
    assert "- interval" not in table([r for r in results if r.method != "interval"])  # a baseline not run: no column


def test_each_round_pairs_the_default_pick_with_every_other_method():
    dice = {"lesion": ((0.3, 0.8), (0.5, 0.9)), "mcdropout": ((0.2, 0.9), (0.2, 0.7))}  # per seed, per round
    results = [
        RoundResult(method, seed, n + 1, 2 * (n + 1), 1, 0, d, d, 10.0 * (n + 1) if method == "mcdropout" else 5.0)
        for method, per_seed in dice.items()
        for seed, rounds in enumerate(per_seed)
        for n, d in enumerate(rounds)
    ]
    rows = {line.split(" | ")[0][2:]: line.strip(" |").split(" | ") for line in rounds_table(results).splitlines()[2:]}
    assert rows["lesion"][1:] == ["0.400 ± 0.141", "0.850 ± 0.071", "5"]  # itself: no difference
    assert rows["mcdropout"][1].startswith("0.200 ± 0.000; +0.200 [")  # (0.1 + 0.3) / 2
    assert rows["mcdropout"][2].startswith("0.800 ± 0.141; +0.050 [")  # (-0.1 + 0.2) / 2: behind in one seed
    assert rows["mcdropout"][3] == "15"


def test_same_seed_same_initial_weights_for_every_method():
    import torch

    from qunet.training import seed_everything

    weights = []
    for dropout in (0.0, 0.2):  # MC dropout's network adds no parameters
        seed_everything(4)
        weights.append(torch.cat([p.flatten() for p in build_network((4, 4, 8, 8, 16, 4), 1, dropout).parameters()]))
    assert torch.equal(*weights)


def test_cli_writes_tables_and_plot_and_the_command_to_rerun_them(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    argv = [
        "rounds",
        "--data",
        str(data),
        "--include",
        "[ab]*",
        "--rounds",
        "2",
        "--per-round",
        "2",
        "--seeds",
        "2",
        "--methods",
        "paper",
        "random",
        "--max-epochs",
        "1",
        "--steps-per-epoch",
        "2",
        "--batch-size",
        "2",
        "--foreground",
        "0.5",
        "--features",
        "4,4,8,8,16,4",
        "--patch-size",
        "32",
        "--device",
        "cpu",
        "--threads",
        str(torch.get_num_threads()),
        "--out",
        str(out),
    ]
    monkeypatch.setattr(sys, "argv", ["qunet", *argv])  # as `python -m qunet rounds ...` sees it
    assert main(argv) == 0
    assert "AUBC - random" in capsys.readouterr().out
    saved = json.loads((out / "rounds.json").read_text())
    assert len(saved["results"]) == 2 * 2 * 2  # seeds x methods x rounds
    assert saved["config"]["train"]["foreground"] == 0.5
    [command] = saved["commands"]
    assert "--include '[ab]*'" in command  # the glob quoted: a shell gives back the same arguments
    assert shlex.split(command) == ["python", "-m", "qunet", *argv]
    assert (out / "rounds.png").read_bytes()[:4] == b"\x89PNG"


def test_a_run_into_the_same_folder_adds_what_is_missing_and_refuses_other_settings(data, tmp_path, capsys):
    out = tmp_path / "out"
    common = [
        "rounds",
        "--data",
        str(data),
        "--rounds",
        "2",
        "--per-round",
        "2",
        "--seeds",
        "1",
        "--max-epochs",
        "1",
        "--batch-size",
        "2",
        "--features",
        "4,4,8,8,16,4",
        "--patch-size",
        "32",
        "--out",
        str(out),
    ]
    assert main([*common, "--steps-per-epoch", "2", "--methods", "random", "--title", "Named run"]) == 0
    first = json.loads((out / "rounds.json").read_text())["results"]
    assert main([*common, "--steps-per-epoch", "2", "--methods", "lesion", "random"]) == 0
    assert (out / "table.md").read_text().startswith("# Named run\n")  # the title outlives a run without --title
    saved = json.loads((out / "rounds.json").read_text())
    assert [r for r in saved["results"] if r["method"] == "random"] == first  # kept, not run again
    assert [r["method"] for r in saved["results"]] == ["random"] * 2 + ["lesion"] * 2
    assert saved["config"]["methods"] == ["random", "lesion"]
    assert "| lesion |" in (out / "table.md").read_text()
    with pytest.raises(SystemExit, match="other settings \\(train\\)"):
        main([*common, "--steps-per-epoch", "3", "--methods", "paper"])
    with pytest.raises(SystemExit, match="other settings \\(train\\)"):
        main([*common, "--steps-per-epoch", "2", "--foreground", "0.3", "--methods", "paper"])
    with pytest.raises(SystemExit):  # argparse: a share lies between 0 and 1
        main([*common, "--steps-per-epoch", "2", "--foreground", "1.5", "--methods", "paper"])


def test_merge_reports_parts_run_apart_on_the_seeds_every_method_finished(data, tmp_path):
    common = [
        "rounds",
        "--data",
        str(data),
        "--rounds",
        "2",
        "--per-round",
        "2",
        "--max-epochs",
        "1",
        "--batch-size",
        "2",
        "--features",
        "4,4,8,8,16,4",
        "--patch-size",
        "32",
        "--steps-per-epoch",
        "2",
    ]
    assert main([*common, "--seeds", "2", "--methods", "random", "--out", str(tmp_path / "random")]) == 0
    assert main([*common, "--seeds", "1", "--methods", "lesion", "--out", str(tmp_path / "lesion")]) == 0
    random_part = json.loads((tmp_path / "random" / "rounds.json").read_text())["results"]
    out = tmp_path / "merged"
    parts = [str(tmp_path / "random"), str(tmp_path / "lesion")]
    assert main([*common, "--seeds", "2", "--merge", *parts, "--out", str(out)]) == 0
    saved = json.loads((out / "rounds.json").read_text())
    # seed 1 only random finished: left out, so both methods are compared on seed 0; nothing was trained again
    assert {(r["method"], r["seed"]) for r in saved["results"]} == {("random", 0), ("lesion", 0)}
    assert [r for r in saved["results"] if r["method"] == "random"] == [r for r in random_part if r["seed"] == 0]
    assert "| lesion |" in (out / "table.md").read_text() and "| random |" in (out / "table.md").read_text()
    with pytest.raises(SystemExit, match="other settings \\(train\\)"):
        main([*common[:-1], "3", "--merge", *parts, "--out", str(out)])  # --steps-per-epoch 3
    with pytest.raises(SystemExit, match="holds no rounds.json"):
        main([*common, "--merge", str(tmp_path / "nowhere"), "--out", str(out)])


def test_error_proxies_report_every_score(data, tmp_path):
    from qunet_bench.proxies import SCORES

    out = tmp_path / "proxies"
    argv = [
        "proxies",
        "--data",
        str(data),
        "--rounds",
        "1",
        "--per-round",
        "2",
        "--seeds",
        "1",
        "--steps-per-epoch",
        "2",
        "--foreground",
        "0.5",
        "--features",
        "4,4,8,8,16,4",
        "--patch-size",
        "32",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    saved = json.loads((out / "proxies.json").read_text())
    assert saved["train"]["foreground"] == 0.5 and saved["train"]["steps_per_epoch"] == 2
    result = saved["results"][0]
    assert result["open"] == 18 - 2 and set(result["scores"]) == set(SCORES)
    assert all(
        0 <= s["lesion_in_top"] <= 2 and (s["spearman"] != s["spearman"] or -1 <= s["spearman"] <= 1)
        for s in result["scores"].values()
    )
