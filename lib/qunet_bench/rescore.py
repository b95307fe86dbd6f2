"""How soon after *Train* the annotator gets a disagreement-phase sample: `python -m qunet rescore [--out
rescore.json]`.

Against a real `monailabel start_server` over a copy of the stacks (default: the repository's sample-data, labels
from its ground-truth/ folder), a simulated annotator runs R rounds of the app's loop: Next sample, a label drawn
from the ground truth on the served slices only, `--samples` times; then Train. From the moment GET /train/ says
DONE, Next sample is asked every `--poll` seconds; the figures per round are the seconds until its answer is in
the disagreement phase (the first volumes re-scored for the new model are used while the rest is scored), and
until no volume waits for the new model's scores (everything re-scored). The server re-scores in the order of
qunet.policy.rescore_order; the run's order and speed come from the scoring progress it reports.
"""

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from qunet.io import IMAGE_SUFFIXES, load_label, load_stack, stack_id

from qunet_bench.cli import positive
from qunet_bench.server import REPO, Server

SAMPLES = REPO / "sample-data"
CLIENT = "annotator"


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(IMAGE_SUFFIXES))


def _draw(image: Path, truth: Path, slices: list[int], out: Path) -> Path:
    """The annotator's label: the ground truth on `slices`, nothing elsewhere, on the image's grid."""
    import nibabel as nib

    stack = load_stack(image)
    label = np.zeros(stack.array.shape, np.uint8)
    label[:, :, slices] = load_label(truth, stack)[:, :, slices] > 0
    nib.save(nib.Nifti1Image(label, stack.affine), out)
    return out


def _annotate(session, server: Server, truth: dict[str, Path], studies: Path, workdir: Path, samples: int) -> int:
    annotated = 0
    for i in range(samples):
        sample = session.post(f"{server.url}/activelearning/qunet", json={"client_id": CLIENT}, timeout=600).json()
        if not sample.get("slices"):
            break
        image = next(p for p in _images(studies) if stack_id(p) == sample["id"])
        label = _draw(image, truth[sample["id"]], sample["slices"], workdir / f"label-{i}.nii.gz")
        with open(label, "rb") as f:
            r = session.put(
                f"{server.url}/datastore/label",
                params={"image": sample["id"]},
                timeout=600,
                data={"params": json.dumps({"client_id": CLIENT})},
                files={"label": (label.name, f)},
            )
        r.raise_for_status()
        annotated += len(sample["slices"])
    return annotated


def _train(session, server: Server, params: dict, timeout: float) -> float:
    """Start a training and return the time GET /train/ first says DONE."""
    session.post(f"{server.url}/train/qunet", json=params, timeout=60).raise_for_status()
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = session.get(f"{server.url}/train/", timeout=60).json().get("status")
        if status == "DONE":
            return time.perf_counter()
        if status == "ERROR":
            raise RuntimeError(f"training failed: see {server.log}")
        time.sleep(0.2)
    raise TimeoutError(f"training did not end in {timeout} s")


def _after_training(session, server: Server, done: float, poll: float, timeout: float) -> dict:
    first = everything = None
    phases = []
    while time.perf_counter() - done < timeout and everything is None:
        answer = session.post(f"{server.url}/activelearning/qunet", json={"client_id": CLIENT}, timeout=600).json()
        now = time.perf_counter() - done
        if not phases or phases[-1][1] != answer.get("phase"):
            phases.append((round(now, 2), answer.get("phase")))
        if first is None and answer.get("phase") == "disagreement":
            first = now
        if "scoring" not in answer and answer.get("phase") == "disagreement":
            everything = now
        time.sleep(poll)
    progress = session.get(f"{server.url}/info/", timeout=60).json()["qunet"]["scoring"]["qunet_disagreement"]
    return {
        "seconds_to_first_disagreement_sample": None if first is None else round(first, 2),
        "seconds_to_rescore_all": None if everything is None else round(everything, 2),
        "phases": phases,
        "volumes": progress.get("volumes_total"),
        "scored": progress.get("scored"),
        "slices_per_second": progress.get("slices_per_second"),
        "order": progress.get("order"),
    }


def run(
    data: Path = SAMPLES,
    rounds: int = 2,
    samples: int = 2,
    conf: dict | None = None,
    train: dict | None = None,
    poll: float = 0.2,
    timeout: float = 3600,
    workdir: str | None = None,
) -> dict:
    import requests

    truth_dir = data / "ground-truth"
    with tempfile.TemporaryDirectory(dir=workdir) as tmp, requests.Session() as session:
        root = Path(tmp)
        studies = root / "studies"
        studies.mkdir()
        truth = {}
        for image in _images(data):
            if (truth_dir / image.name).exists():
                shutil.copy(image, studies / image.name)
                truth[stack_id(image)] = truth_dir / image.name
        if not truth:
            raise ValueError(f"{data}: no image with a label of the same name in {truth_dir}")
        out: dict = {"data": str(data), "volumes": len(truth), "conf": conf or {}, "train": train or {}, "rounds": []}
        with Server(studies, root, conf, {"MONAI_LABEL_AUTO_UPDATE_SCORING": "true"}) as server:
            annotated = 0
            for r in range(rounds):
                annotated += _annotate(session, server, truth, studies, root, samples)
                done = _train(session, server, train or {}, timeout)
                out["rounds"].append(
                    {
                        "round": r + 1,
                        "annotated_slices": annotated,
                        **_after_training(session, server, done, poll, timeout),
                    }
                )
            out["failed_to_trigger_logged"] = "Failed To Trigger" in server.log.read_text(errors="replace")
    return out


def render(result: dict) -> str:
    lines = [f"{result['volumes']} volumes from {result['data']}, conf {result['conf']}, train {result['train']}"]
    for r in result["rounds"]:
        lines.append(
            f"round {r['round']} ({r['annotated_slices']} slices annotated): Train done -> first "
            f"disagreement-phase Next sample {r['seconds_to_first_disagreement_sample']} s; -> all "
            f"{r['volumes']} volumes re-scored {r['seconds_to_rescore_all']} s "
            f"({r['slices_per_second']} slices/s while scoring)"
        )
    return "\n".join(lines)


def _pairs(values: list[str]) -> dict[str, str]:
    pairs = dict(v.split("=", 1) for v in values)
    return {k.strip(): v.strip() for k, v in pairs.items()}


def add_arguments(p) -> None:
    p.add_argument("--data", type=Path, default=SAMPLES, help="stacks, with full labels in DATA/ground-truth/")
    p.add_argument("--out", default="rescore.json", help="JSON file for the figures")
    p.add_argument(
        "--rounds", type=positive, default=2, help="Train rounds (the first has no earlier scores to order by)"
    )
    p.add_argument("--samples", type=positive, default=2, help="Next sample answers annotated before each Train")
    p.add_argument("--conf", nargs="*", default=[], metavar="KEY=VALUE", help="app settings (--conf of the server)")
    p.add_argument(
        "--train", nargs="*", default=[], metavar="KEY=VALUE", help="train request settings, e.g. max_epochs=5"
    )
    p.add_argument("--poll", type=float, default=0.2, help="seconds between Next sample requests after Train")


def main(args) -> None:
    train = {k: (int(v) if v.isdigit() else v) for k, v in _pairs(args.train).items()}
    result = run(args.data, args.rounds, args.samples, _pairs(args.conf), train, args.poll)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(render(result))
    print(f"written: {args.out}")
