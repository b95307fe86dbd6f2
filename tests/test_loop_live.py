"""The loop as the annotator sees it on a live server: phase `scoring` while the current model's disagreement scoring
is queued or running, its progress in Next sample's answer, in GET /info/ and in the log, then the stop signal when
no unannotated slice is below q0.

q0 = 0: no slice is ever below it, so Next sample (the paper's pick, which serves slices below q0 only) stays in
phase `scoring` for the whole run and then says stop.
MONAI Label's automatic scoring is off: the run starts when the test asks for it.
"""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
import torch

from live_server import LiveServer, wait_for
from qunet import build_network
from qunet.io import file_signature
from qunet_bench.synthetic import generate_stack

TINY = (8, 8, 16, 16, 32, 8)
VOLUMES = [f"ct{i}" for i in range(6)]
SHAPE = (96, 96, 16)  # big enough for the run to take a few seconds, so that it is seen running


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    studies = root / "studies"
    studies.mkdir()
    for i, name in enumerate(VOLUMES):
        image = generate_stack("ct", 10 + i, SHAPE).image.astype(np.int16)
        nib.save(nib.Nifti1Image(image, np.diag([0.8, 0.8, 4.0, 1.0])), studies / f"{name}.nii.gz")
    weights = root / "pretrained.pt"
    torch.manual_seed(0)
    torch.save({"model": build_network(TINY).state_dict()}, weights)
    conf = {
        "patch_size": "96",
        "features": ",".join(map(str, TINY)),
        "q0": "0",
        "slices_per_sample": "3",
        "pretrained_path": str(weights),
        "pick": "paper",
    }
    env = {"OMP_NUM_THREADS": "1", "MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}
    srv = LiveServer(studies, root, conf=conf, env=env).start()
    srv.weights = weights
    yield srv
    srv.stop()
    print(srv.tail(20))


def next_sample(server) -> dict:
    r = requests.post(f"{server.url}/activelearning/qunet", json={"client_id": "watcher"}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def qunet_info(server) -> dict:
    return requests.get(f"{server.url}/info/", timeout=60).json()["qunet"]


def test_scoring_phase_progress_then_stop(server):
    queued = next_sample(server)
    assert queued["phase"] == "scoring" and queued["scoring"] == {"pending_volumes": len(VOLUMES), "state": "queued"}
    assert queued["id"] == "ct0" and queued["slices"]  # meanwhile the S0 pick (quality scored on demand)
    assert qunet_info(server)["phase"] == "scoring"

    r = requests.post(f"{server.url}/scoring/qunet_disagreement", timeout=30)
    assert r.status_code == 200, r.text
    answers = []
    while not answers or "scoring" in answers[-1]:
        answers.append(next_sample(server))
        assert len(answers) < 2000, "scoring did not finish"
    running = [a for a in answers if a.get("scoring", {}).get("state") == "running"]
    assert running, f"never seen running: {[a.get('scoring') for a in answers]}"
    for a in running:
        s = a["scoring"]
        assert a["phase"] == "scoring" and 0 <= s["volumes_done"] < s["volumes_total"] == len(VOLUMES)
        assert 0 < s["pending_volumes"] <= len(VOLUMES)
    done = [a["scoring"]["volumes_done"] for a in running]
    assert done == sorted(done)  # progress only moves forward

    stop = answers[-1]
    assert stop["id"] == "" and stop["slices"] == [] and stop["phase"] == "disagreement"
    assert stop["stop"]["reason"] == "no_slice_below_q0" and stop["message"] == stop["stop"]["message"]
    model = file_signature(server.weights)
    info = wait_for(lambda: (i := qunet_info(server))["stop"] and i, 10, "stop in /info/")
    assert info["stop"]["reason"] == "no_slice_below_q0" and info["phase"] == "disagreement"
    assert info["pending_volumes"] == 0 and info["model"]["signature"] == model
    progress = info["scoring"]["qunet_disagreement"]
    assert progress["state"] == "done" and progress["model"] == model
    assert progress["volumes_done"] == progress["volumes_total"] == progress["scored"] == len(VOLUMES)
    assert progress["slices_scored"] == len(VOLUMES) * SHAPE[2] and progress["slices_per_second"] > 0
    assert progress["order"] == VOLUMES  # none scored before: id order
    quality = info["scoring"]["qunet_quality"]
    assert quality == {} or quality["state"] in ("done", "running")  # not started by itself: auto scoring is off

    agreement = json.loads(Path(server.app_dir, "model", "agreement.json").read_text())
    assert [e["model"] for e in agreement] == [model] and agreement[0]["open_slices"] == len(VOLUMES) * SHAPE[2]
    log = server.log.read_text()
    assert f"qunet_disagreement: {len(VOLUMES)}/{len(VOLUMES)} volumes ({len(VOLUMES)} scored" in log
    assert "Failed to update Image info for" not in log  # the answer without a volume is not MONAI Label's warning
