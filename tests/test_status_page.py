"""One pick, one place, and what the annotation lead sees, against a live server with tiny settings.

- The app's Next sample and a benchmark-style caller of qunet.policy.choose, given the records read from the
  server's datastore, pick the same volume, slices, scores and q0 (with a budget lowering q0, and a hold).
- The status page at /qunet/ in headless Chromium shows the volumes with the counts the records hold, the Q
  histogram, the held-out Dice and the Dice plot from the trainer's history.json, and cannot be used for script
  injection: one image id is an HTML tag.
"""

import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
import torch
from PIL import Image

from live_server import LiveServer, wait_for
from qunet import build_network
from qunet.config import SelectionConfig
from qunet.io import file_signature
from qunet.policy import LoopState, VolumeState, choose
from qunet_bench.synthetic import generate_stack
from test_ohif import browser  # noqa: F401 (headless Chromium through Debian's chromedriver)

TINY = (4, 4, 8, 8, 16, 4)
HOSTILE = "<img src=x onerror=alert(1)>"  # an image id (a file name) that is an HTML tag
IMAGES = ["ct1", "ct2", "oct1", HOSTILE]
SETTINGS = SelectionConfig(q0=1.01, slices_per_sample=3, budget=20)
AFFINE = np.diag([0.8, 0.8, 4.0, 1.0])
SHAPE = (48, 48, 10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("status")
    studies = root / "studies"
    studies.mkdir()
    for i, name in enumerate(IMAGES):
        image = generate_stack("oct" if name.startswith("oct") else "ct", i, SHAPE).image.astype(np.int16)
        nib.save(nib.Nifti1Image(image, AFFINE), studies / f"{name}.nii.gz")
    weights = root / "pretrained.pt"
    torch.manual_seed(0)
    torch.save({"model": build_network(TINY).state_dict()}, weights)
    conf = {
        "patch_size": "32",
        "features": ",".join(map(str, TINY)),
        "q0": str(SETTINGS.q0),
        "slices_per_sample": str(SETTINGS.slices_per_sample),
        "budget": str(SETTINGS.budget),
        "pretrained_path": str(weights),
    }
    env = {"OMP_NUM_THREADS": "1", "MONAI_LABEL_AUTO_UPDATE_SCORING": "true"}
    srv = LiveServer(studies, root, conf=conf, env=env).start()
    srv.model = file_signature(weights)
    wait_for(
        lambda: (
            (q := qunet_info(srv))["pending_volumes"] == 0 and q["scoring"]["qunet_disagreement"].get("state") == "done"
        ),
        300,
        "start-up scoring",
    )
    yield srv
    srv.stop()
    print(srv.tail(20))


def qunet_info(server) -> dict:
    return requests.get(f"{server.url}/info/", timeout=60).json()["qunet"]


def records(server) -> dict[str, dict]:
    objects = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=60).json()["objects"]
    return {image_id: obj["image"]["info"] for image_id, obj in objects.items()}


def volume_states(infos: dict[str, dict], model: str, client: str | None, hold: float = 600) -> list[VolumeState]:
    """The records as the policy's input, written here from the documented record format, not taken from the app."""
    now, volumes = time.time(), []
    for image_id, info in infos.items():
        held = {
            k
            for c, s in (info.get("qunet_served") or {}).items()
            if c != client and not s.get("submitted") and now - s["ts"] < hold
            for k in s["slices"]
        }
        rec = info.get("qunet_disagreement") or {}
        current = rec.get("model") == model
        volumes.append(
            VolumeState(
                image_id,
                info["qunet_quality"]["initial"],
                rec["q"] if current else None,
                frozenset(info.get("qunet_annotated", [])),
                frozenset(held),
                bool(info.get("qunet_error")),
                area=rec["area"] if current else None,
                depth=info["qunet_quality"]["slices"],
                constant=frozenset(k for k, ok in enumerate(info["qunet_quality"]["valid"]) if not ok),
            )
        )
    return volumes


def loop_state(server) -> LoopState:
    entries = json.loads(Path(server.app_dir, "model", "agreement.json").read_text())
    assert entries[-1]["model"] == server.model
    return LoopState(has_model=True, agreement=[e["agreement"] for e in entries])


def next_sample(server, client: str) -> dict:
    r = requests.post(f"{server.url}/activelearning/qunet", json={"client_id": client}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_app_and_policy_pick_the_same_from_the_same_records(server):
    """With the default pick (`lesion`)."""
    answers = []
    for client in ("alice", "bob"):  # bob asks while alice holds her slices
        infos = records(server)
        expected = choose(volume_states(infos, server.model, client), loop_state(server), SETTINGS)
        answers.append(answer := next_sample(server, client))
        assert expected.slices, "nothing to compare"
        assert (answer["id"], answer["slices"], answer["phase"]) == (expected.image_id, expected.slices, expected.phase)
        rec = infos[expected.image_id]["qunet_disagreement"]
        assert answer["scores"] == {k: [rec[k][i] for i in expected.slices] for k in ("q", "area")}
        assert answer["q0"] == expected.q0 and answer["budget"] == {
            "budget": SETTINGS.budget,
            "remaining": expected.remaining,
        }
    assert expected.remaining == SETTINGS.budget - len(
        answers[0]["slices"]
    )  # alice's held slices count against the budget
    assert expected.q0 < SETTINGS.q0  # more open slices than the budget left: q0 lowered to fit


def save_label(server, image_id: str, slices: list[int], client: str) -> None:
    label = np.zeros(SHAPE, np.uint8)
    label[10:20, 12:22, slices] = 1
    path = Path(server.app_dir).parent / "label.nii.gz"
    nib.save(nib.Nifti1Image(label, AFFINE), path)
    with open(path, "rb") as f:
        r = requests.put(
            f"{server.url}/datastore/label",
            params={"image": image_id},
            timeout=120,
            data={"params": json.dumps({"client_id": client})},
            files={"label": (path.name, f)},
        )
    assert r.status_code == 200, r.text


HISTORY = [  # as the trainer writes it: held-out Dice of the previous model on the slices annotated since
    {
        "ts": 1000,
        "model": "a",
        "slices": 5,
        "volumes": 1,
        "lesion_slices": 2,
        "heldout": {"dice": None, "slices": 0, "lesion_slices": 0},
        "train_dice": 0.61,
        "loss": 0.5,
        "steps": 10,
        "seconds": 3.0,
    },
    {
        "ts": 2000,
        "model": "b",
        "slices": 10,
        "volumes": 2,
        "lesion_slices": 4,
        "heldout": {"dice": 0.42, "slices": 5, "lesion_slices": 2},
        "train_dice": 0.7,
        "loss": 0.4,
        "steps": 10,
        "seconds": 3.0,
    },
    {
        "ts": 3000,
        "model": None,
        "slices": 20,
        "volumes": 3,
        "lesion_slices": 8,
        "heldout": {"dice": 0.55, "slices": 10, "lesion_slices": 4},
        "train_dice": 0.8,
        "loss": 0.3,
        "steps": 10,
        "seconds": 3.0,
    },
    "not an entry",
]


def test_status_page_shows_the_records(server, browser, tmp_path):  # noqa: F811
    sample = next_sample(server, "carol")
    save_label(server, sample["id"], sample["slices"], "carol")
    HISTORY[2]["model"] = server.model
    Path(server.app_dir, "model", "history.json").write_text(json.dumps(HISTORY))

    r = requests.get(f"{server.url}/qunet/", timeout=60)
    assert r.status_code == 200 and "script-src" not in r.headers["Content-Security-Policy"]
    assert HOSTILE not in r.text  # escaped
    infos = records(server)
    browser.get(f"{server.url}/qunet/")
    shot = tmp_path / "status.png"
    browser.save_screenshot(str(shot))
    print(f"screenshot: {shot}")

    from selenium.webdriver.common.by import By

    rows = [
        [td.text for td in tr.find_elements(By.TAG_NAME, "td")]
        for tr in browser.find_elements(By.CSS_SELECTOR, "#volumes tr")[1:]
    ]
    pick = choose(volume_states(infos, server.model, None), loop_state(server), SETTINGS)
    expected = []
    for image_id in sorted(infos):
        info, rec = infos[image_id], infos[image_id]["qunet_disagreement"]
        annotated = set(info.get("qunet_annotated", []))
        held = {
            k for c, s in info.get("qunet_served", {}).items() if not s.get("submitted") for k in s["slices"]
        } - annotated
        flagged = sum(q is not None and q < pick.q0 and k not in annotated for k, q in enumerate(rec["q"]))
        expected.append([image_id, str(len(annotated)), str(len(held)), str(flagged)])
    assert [row[:4] for row in rows] == expected  # the hostile id shows as text, in its place
    assert sum(int(row[1]) for row in expected) == len(sample["slices"]) > 0
    assert browser.find_element(By.ID, "phase").text == "disagreement"
    assert browser.find_element(By.ID, "annotated").text == str(len(sample["slices"]))
    assert browser.find_element(By.ID, "heldout").text == "0.550"
    assert server.model in browser.find_element(By.ID, "model").text
    assert len(browser.find_elements(By.CSS_SELECTOR, "#histogram rect")) == 10
    assert len(browser.find_elements(By.CSS_SELECTOR, "#dice circle")) == 3 + 2  # training Dice x3, held-out x2
    assert "qunet_disagreement" in browser.find_element(By.ID, "scoring").text
    assert browser.find_elements(By.TAG_NAME, "img") == []  # no injected element
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10  # a rendered page, not a blank one
