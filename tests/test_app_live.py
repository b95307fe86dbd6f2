"""The app as 3D Slicer drives it: a real `monailabel start_server` on 127.0.0.1 and MONAILabelClient.

Two rounds of Next sample / download / Submit label / Train / score / Next sample on a real clinical stack
(pyradiomics breast1, NRRD) and a synthetic CT-like stack (NIfTI), with a small network so it runs on CPU.
"""

import importlib.metadata
import json
import shutil
from pathlib import Path
from urllib.parse import quote_plus

import numpy as np
import pytest
import requests
import SimpleITK as sitk
from monailabel.client import MONAILabelClient

from live_server import SAMPLES, TRUTH, LiveServer, draw_truth, wait_for
from qunet import __version__
from qunet.config import TrainConfig
from qunet.io import file_signature, load_label, load_stack
from qunet_bench.synthetic import generate_stack

# pick: the paper's order, which the assertions below check (S0 best quality first, then the lowest Q)
TINY_CONF = {"patch_size": "32", "features": "8,8,16,16,32,8", "slices_per_sample": "4", "q0": "1.01", "pick": "paper"}
TRAIN = {"max_epochs": 3, "steps_per_epoch": 4, "train_batch_size": 4}
CLIENT = "slicer-a"


def write_nifti(array: np.ndarray, path: Path, spacing=(0.7, 0.7, 5.0)) -> None:
    image = sitk.GetImageFromArray(np.transpose(array, (2, 1, 0)))
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("live")
    studies, truth = root / "studies", root / "truth"
    studies.mkdir(), truth.mkdir()
    shutil.copy(SAMPLES / "breast1.nrrd", studies / "breast1.nrrd")
    shutil.copy(TRUTH / "breast1.nrrd", truth / "breast1.nrrd")
    ct = generate_stack("ct", seed=3, shape=(64, 64, 12))
    write_nifti(ct.image.astype(np.int16), studies / "ct3.nii.gz")
    write_nifti(ct.label.astype(np.uint8), truth / "ct3.nii.gz")
    return {"root": root, "studies": studies, "truth": truth}


@pytest.fixture(scope="module")
def server(data):
    srv = LiveServer(data["studies"], data["root"], conf=TINY_CONF).start()
    yield srv
    srv.stop()
    print(srv.tail(30))


def truth_path(data: dict, image_id: str) -> Path:
    return next(data["truth"].glob(f"{image_id}.*"))


def train(client: MONAILabelClient, server: LiveServer) -> dict:
    client.train_start("qunet", TRAIN)
    status = wait_for(
        lambda: (s := client.train_status()) and s.get("status") in ("DONE", "ERROR") and s, 300, "training"
    )
    assert status["status"] == "DONE", server.tail()
    return status


def test_slicer_sequence_two_rounds(server, data, tmp_path):
    client = MONAILabelClient(server.url, tmpdir=str(tmp_path), client_id=CLIENT)
    info = client.info()
    assert "qunet" in info["models"] and info["models"]["qunet"]["type"] == "segmentation"
    assert {"qunet", "random"} <= set(info["strategies"])
    assert {"qunet_quality", "qunet_disagreement"} <= set(info["scoring"])
    assert info["trainers"]["qunet"]["config"]["max_epochs"] == TrainConfig().max_epochs  # the library's recipe
    assert info["qunet"]["version"] == __version__ == importlib.metadata.version("qunet")  # pyproject reads it

    annotated: dict[str, set[int]] = {}
    for round_ in (1, 2):
        sample = client.next_sample("qunet", {})
        image_id, slices = sample["id"], sample["slices"]
        depth = load_stack(sample["path"]).num_slices
        assert sample["phase"] == ("initial" if round_ == 1 else "disagreement")
        assert 0 < len(slices) <= 4 and all(isinstance(k, int) and 0 <= k < depth for k in slices)
        assert not set(slices) & annotated.get(image_id, set()), "served an annotated slice again"
        assert sample["name"] and str(slices[0]) in sample["PatientID"]
        if round_ == 1:
            quality = server.image_info(image_id)["qunet_quality"]
            assert slices == quality["initial"][: len(slices)]  # S0, best quality first
        else:
            q = sample["scores"]["q"]
            assert q == sorted(q)  # most informative (lowest Q) first
            record = server.image_info(image_id)["qunet_disagreement"]
            open_q = [v for k, v in enumerate(record["q"]) if v is not None and k not in annotated.get(image_id, set())]
            assert q[0] == min(open_q)

        # Slicer downloads the image by id and submits a label volume in its geometry
        r = requests.get(f"{server.url}/datastore/image?image={quote_plus(image_id)}", timeout=30)
        assert r.ok
        image_file = tmp_path / sample["name"]
        image_file.write_bytes(r.content)
        label_file = tmp_path / f"{image_id}-label-{round_}.nii.gz"
        draw_truth(truth_path(data, image_id), image_file, slices, label_file)
        params = {"label_info": [{"name": "lesion", "idx": 1}]}
        saved = client.save_label(image_id, str(label_file), params=params)
        # the label only has content on the served slices: annotated = earlier ones + the served ones
        assert set(saved["annotated_slices"]) == set(slices) | annotated.get(image_id, set())
        annotated[image_id] = set(saved["annotated_slices"])

        status = train(client, server)
        assert any(f"epoch {TRAIN['max_epochs']}/{TRAIN['max_epochs']}: loss" in line for line in status["details"])
        stats = client.info()["train_stats"]["qunet"]  # what Slicer's progress bars read
        assert stats["epoch"] == stats["total_epochs"] == TRAIN["max_epochs"] and stats["loss"] > 0
        assert 0 <= stats["best_metric"] <= 1 and stats["slices"] == sum(map(len, annotated.values()))
        history = json.loads(Path(server.app_dir, "model", "history.json").read_text())
        assert len(history) == round_ and history[-1]["slices"] == stats["slices"]
        assert history[-1]["model"] == file_signature(Path(server.app_dir, "model", "qunet.pt"))
        if round_ == 1:
            assert history[-1]["heldout"] is None  # no earlier model
        else:  # the first model, on the slices annotated since it was trained
            assert history[-1]["heldout"]["slices"] == len(slices) and 0 <= history[-1]["heldout"]["dice"] <= 1
        r = requests.post(f"{server.url}/scoring/qunet_disagreement", timeout=30)
        assert r.status_code in (200, 429)  # 429: the post-training scoring is still running
        model = file_signature(Path(server.app_dir, "model", "qunet.pt"))
        wait_for(
            lambda: (server.image_info(image_id).get("qunet_disagreement") or {}).get("model") == model,
            300,
            "disagreement scores of the new model",
        )

    sample = client.next_sample("qunet", {})
    assert sample["phase"] == "disagreement"
    assert not set(sample["slices"]) & annotated.get(sample["id"], set())


def test_infer_label_matches_image_geometry(server, data, tmp_path):
    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))  # not /tmp: the server deletes its own copy there
    assert Path(server.app_dir, "model", "qunet.pt").exists(), "runs after the two-round test, which trains"
    for image_id in ("breast1", "ct3"):
        label_file, result = client.infer("qunet", image_id, {})
        image = load_stack(next(data["studies"].glob(f"{image_id}.*")))
        label = load_label(label_file, image)  # raises unless shape and affine equal the image's
        assert label.shape == image.array.shape
        assert result["label_names"] == {"lesion": 1}


def test_stock_client_without_client_id_drives_the_loop_with_auto_train(data, tmp_path):
    """MONAILabelClient(url) sends "client_id": null: an anonymous client, for Next sample, labels and holds."""
    studies = tmp_path / "studies"
    studies.mkdir()
    for image in data["studies"].glob("*.nii.gz"):  # the small stacks; not the other server's records
        shutil.copy(image, studies)
    conf = {**TINY_CONF, "auto_train_after": "1", "max_epochs": "2", "steps_per_epoch": "15"}  # a short auto-training
    srv = LiveServer(studies, tmp_path, conf=conf).start()
    try:
        client = MONAILabelClient(srv.url, tmpdir=str(tmp_path))
        with pytest.raises(Exception):
            client.train_status()  # nothing trained yet: 404
        sample = client.next_sample("qunet", {})
        assert sample["slices"] and sample["phase"] == "initial"
        served = srv.image_info(sample["id"])["qunet_served"]
        assert list(served) == ["anonymous"] and served["anonymous"]["slices"] == sample["slices"]
        image_file = Path(sample["path"])
        label = tmp_path / "label.nii.gz"
        draw_truth(truth_path(data, sample["id"]), image_file, sample["slices"], label)
        client.save_label(sample["id"], str(label), tag="draft")
        with pytest.raises(Exception):
            # a draft is not a label to train on: no auto-training (it is queued as the save answers)
            client.train_status()
        saved = client.save_label(sample["id"], str(label), params={"label_info": [{"name": "lesion", "idx": 1}]})
        assert saved["annotated_slices"] == sorted(sample["slices"])  # the anonymous client's served slices
        status = wait_for(
            lambda: (s := client.train_status()) and s.get("status") in ("DONE", "ERROR") and s, 300, "auto-training"
        )
        assert status["status"] == "DONE", srv.tail()
        assert (Path(srv.app_dir) / "model" / "qunet.pt").exists()
        info = client.info()
        assert info["trainers"]["qunet"]["config"]["steps_per_epoch"] == 15  # the conf's length, as Slicer shows it
        assert info["train_stats"]["qunet"]["total_epochs"] == 2
    finally:
        srv.stop()
