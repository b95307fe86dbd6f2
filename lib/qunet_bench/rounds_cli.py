"""`python -m qunet rounds`: the multi-round benchmark's command line, and resuming a run into the same folder.

    python -m qunet rounds --data FOLDER [--include GLOB...] --rounds 4 --per-round 12 --seeds 5 --out DIR

A run into a folder that holds results of the same settings adds only the (method, seed) pairs missing there; with
--merge it runs nothing and reports together the folders of runs split over processes or machines. The benchmark
itself is qunet_bench.activelearning.
"""

import argparse
import json
import os
import sys
from dataclasses import asdict, replace
from pathlib import Path

from qunet_bench.activelearning import METHODS, Benchmark, RoundResult, RoundsConfig
from qunet_bench.al_report import report
from qunet_bench.cli import add_machine_arguments, machine, positive, recorded_command, share, widths
from qunet_bench.data import find_pairs, load_cases


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = RoundsConfig()
    p.add_argument("--data", required=True, help="folder of stacks; full labels in DATA/ground-truth/")
    p.add_argument("--include", nargs="+", default=[], metavar="GLOB")
    p.add_argument("--rounds", type=positive, default=d.rounds)
    p.add_argument(
        "--per-round", type=positive, default=d.per_round, help="slices annotated each round by every method"
    )
    p.add_argument("--seeds", type=positive, default=d.seeds)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(d.methods))
    p.add_argument("--max-epochs", type=positive, default=d.train.max_epochs, help="training per round, in epochs")
    p.add_argument("--steps-per-epoch", type=positive, default=d.train.steps_per_epoch)
    p.add_argument("--batch-size", type=positive, default=d.train.batch_size)
    p.add_argument(
        "--foreground",
        type=share,
        default=d.train.foreground,
        help="share of training patches centred on an annotated lesion pixel",
    )
    p.add_argument("--features", type=widths, default=d.model.features)
    p.add_argument("--patch-size", type=positive, default=d.model.patch_size)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--title",
        default="",
        help="of the table and plot (default: the title of the folder's earlier runs, else the stacks' names)",
    )
    p.add_argument(
        "--merge",
        nargs="+",
        default=[],
        metavar="DIR",
        help="run nothing: report into --out the results "
        "of these folders' runs of the same settings (e.g. one process per method), on the seeds every "
        "method finished",
    )
    add_machine_arguments(p)


def _settings(config: dict) -> dict:
    """What a result depends on, JSON-typed: not the seeds and methods run, nor the default pick and neighbour labels
    (each method sets its own)."""
    config = json.loads(json.dumps(config, default=str))
    config["selection"].pop("pick", None)
    config["train"].pop("neighbours", None)
    return {k: v for k, v in config.items() if k not in ("seeds", "methods")}


def earlier_results(path: Path, config: RoundsConfig) -> tuple[list[RoundResult], list[str], str]:
    """The results, commands and title of earlier runs into the same folder with the same settings (seeds and
    methods aside): a run adds the (method, seed) pairs it lacks, so new methods are compared with the same seeds'
    results without rerunning them. Other settings: an error, not a silent mix."""
    if not path.is_file():
        return [], [], ""
    saved = json.loads(path.read_text())
    mine, theirs = _settings(asdict(config)), _settings(saved["config"])
    differ = sorted(k for k in mine if theirs.get(k) != mine[k])
    if differ:
        raise SystemExit(f"{path} holds results of other settings ({', '.join(differ)}): use another --out")
    commands = saved["commands"] if "commands" in saved else [saved["command"]]  # one command before resuming existed
    results = [RoundResult(**{**r, "picked": [tuple(p) for p in r["picked"]]}) for r in saved["results"]]
    return results, commands, saved.get("title", "")


def merged(folders: list[str], config: RoundsConfig) -> tuple[list[RoundResult], list[str], str]:
    """The results of several folders' runs of the same settings, on the seeds every method finished there: a seed
    that one process did not finish (a run stopped early) would compare methods on different seeds."""
    results, commands, title = [], [], ""
    for folder in folders:
        theirs, their_commands, their_title = earlier_results(Path(folder) / "rounds.json", config)
        if not theirs:
            raise SystemExit(f"{folder} holds no rounds.json")
        known = {(r.method, r.seed) for r in results}
        results += [r for r in theirs if (r.method, r.seed) not in known]
        commands += [c for c in their_commands if c not in commands]
        title = title or their_title
    by_method: dict[str, set[int]] = {}
    for r in results:
        by_method.setdefault(r.method, set()).add(r.seed)
    common = set.intersection(*by_method.values())
    return [r for r in results if r.seed in common], commands, title


def save(out: Path, title: str, commands: list[str], config: RoundsConfig, results: list[RoundResult]) -> None:
    """rounds.json, replaced whole (a run killed while writing leaves the previous file, not half of one)."""
    held = {
        **asdict(config),
        "methods": list(dict.fromkeys(r.method for r in results)),
        "seeds": len({r.seed for r in results}),
    }
    part = out / "rounds.json.part"
    part.write_text(
        json.dumps(
            {"title": title, "commands": commands, "config": held, "results": [asdict(r) for r in results]},
            indent=1,
            default=str,
        )
    )
    os.replace(part, out / "rounds.json")


def main(args: argparse.Namespace) -> None:
    device = machine(args)
    d = RoundsConfig()
    config = replace(
        d,
        rounds=args.rounds,
        per_round=args.per_round,
        seeds=args.seeds,
        methods=tuple(args.methods),
        model=replace(d.model, features=args.features, patch_size=args.patch_size),
        train=replace(
            d.train,
            max_epochs=args.max_epochs,
            steps_per_epoch=args.steps_per_epoch,
            batch_size=args.batch_size,
            foreground=args.foreground,
        ),
    )
    cases = load_cases(find_pairs(args.data, include=args.include))
    command = recorded_command("rounds")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, commands, title = (
        merged(args.merge, config) if args.merge else earlier_results(out / "rounds.json", config)
    )
    title = args.title or title or f"Active-learning rounds on {', '.join(c.name for c in cases)}"
    commands = [*commands, command] if command and command not in commands else commands
    if args.merge:
        save(out, title, commands, config, results)
        print(report(results, cases, out, title, commands))
        return
    bench = Benchmark(cases, config, device)
    done = {(r.method, r.seed) for r in results}
    for seed in range(config.seeds):
        for method in config.methods:
            if (method, seed) in done:
                continue
            results += bench.run(
                method,
                seed,
                lambda r: print(
                    f"seed {r.seed} {r.method} round {r.round}: {r.annotated} slices ({r.lesion_annotated} lesion, "
                    f"{r.filled} filled), Dice {r.dice:.3f} / lesion slices {r.dice_lesion_slices:.3f} "
                    f"({r.seconds:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                ),
            )
        save(out, title, commands, config, results)  # after every seed: an interrupted run keeps the seeds it finished
        table = report(results, cases, out, title, commands)
    print(table)
