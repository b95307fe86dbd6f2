"""App behaviour that needs no live server: conf parsing, a pretrained model, nothing left to annotate."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from app_inprocess import APP, app_client
from qunet import build_network, load_stack, segment
from qunet.network import load_weights, prepare
from qunet_bench.synthetic import generate_stack

TINY = "4,4,8,8,16,4"


def load_conf_class():
    import sys

    sys.path.insert(0, str(APP))
    from qunet_app.settings import AppConf

    return AppConf


def test_conf_parsing_and_errors():
    AppConf = load_conf_class()
    conf = AppConf.from_conf(
        {
            "q0": "0.3",
            "features": TINY,
            "labels": "cyst, ggo",
            "patch_size": "64",
            "blur_percentile": "40",
            "psnr_percentile": "mean",
        }
    )
    assert conf.q0 == 0.3 and conf.features == (4, 4, 8, 8, 16, 4) and conf.patch_size == 64
    assert conf.label_map() == {"cyst": 1, "ggo": 2}
    assert conf.blur_percentile == 40 and conf.psnr_percentile is None
    assert AppConf.from_conf({}).features == (8, 16, 32, 64, 128, 8)
    for bad, message in (
        ({"q0": "high"}, "q0"),
        ({"features": "1,2,3"}, "six"),
        ({"patch_size": "100"}, "multiple of 16"),
        ({"labels": " , "}, "labels"),
        ({"random_strategy": "epistemic"}, "random_strategy"),
        ({"allow_model_upload": "maybe"}, "allow_model_upload"),
        ({"max_voxels": "0"}, "max_voxels"),
        ({"steps_per_epoch": "0"}, "steps_per_epoch"),
        ({"max_epochs": "ten"}, "max_epochs"),
        ({"neighbour_labels": "nearest"}, "neighbour_labels"),
        ({"median_window": "0"}, "median_window"),
        ({"blur_percentile": "101"}, "blur_percentile must be from 0 to 100"),
        ({"slices_per_sample": "0"}, "slices_per_sample"),
        ({"q0": "nan"}, "q0"),
        ({"hold_seconds": "-1"}, "hold_seconds must be 0 or more"),
    ):
        with pytest.raises(ValueError, match=message):
            AppConf.from_conf(bad)


def test_conf_warns_of_keys_it_does_not_know(caplog):
    AppConf = load_conf_class()
    with caplog.at_level("WARNING"):
        assert AppConf.from_conf({"q_0": "0.2", "server_mode": "true"}).q0 == AppConf().q0
    assert "--conf q_0: not a setting of this app" in caplog.text and "server_mode" not in caplog.text


@pytest.fixture
def studies(tmp_path) -> Path:
    folder = tmp_path / "studies"
    folder.mkdir()
    for seed in (1, 2):
        s = generate_stack("ct", seed, (48, 48, 8))
        nib.save(nib.Nifti1Image(s.image.astype(np.int16), np.diag([0.7, 0.7, 5, 1])), folder / f"ct{seed}.nii.gz")
    return folder


def test_pretrained_model_drives_disagreement_and_infer(studies, tmp_path):
    weights = tmp_path / "other-modality.pt"
    torch.manual_seed(0)
    torch.save({"model": build_network(tuple(map(int, TINY.split(",")))).state_dict()}, weights)
    client = app_client(studies, {"features": TINY, "patch_size": "32", "pretrained_path": str(weights), "q0": "1.01"})

    r = client.post("/scoring/qunet_disagreement?run_sync=true")
    assert r.status_code == 200 and r.json()["scored"] == 2
    assert client.post("/scoring/qunet_disagreement?run_sync=true").json() == {"scored": 0, "skipped": 2, "failed": 0}
    sample = client.post("/activelearning/qunet", json={"client_id": "a"}).json()
    assert sample["phase"] == "disagreement" and sample["slices"]
    info = client.get("/datastore/image/info", params={"image": sample["id"]}).json()
    rec = info["qunet_disagreement"]
    assert sample["scores"] == {k: [rec[k][i] for i in sample["slices"]] for k in ("q", "area")}
    # the recorded lesion area is the level-4 segmentation's, slice by slice
    cpu = torch.device("cpu")
    network = prepare(load_weights(build_network(tuple(map(int, TINY.split(",")))), str(weights), cpu), cpu)
    found = segment(network, load_stack(str(studies / f"{sample['id']}.nii.gz")).array, 32) > 0
    assert rec["area"] == found.sum(axis=(0, 1)).astype(float).tolist()

    r = client.post("/infer/qunet?image=ct1&output=image", data={"params": "{}"})
    assert r.status_code == 200
    out = tmp_path / "pred.nii.gz"
    out.write_bytes(r.content)
    pred, image = nib.load(out), nib.load(studies / "ct1.nii.gz")
    assert pred.shape == image.shape and np.allclose(pred.affine, image.affine, atol=1e-4)


def test_training_adds_the_neighbours_of_submitted_lesion_slices_as_the_conf_says(studies, tmp_path):
    """`--conf neighbour_labels copy`: the app's trainer also trains on the unannotated neighbours of each submitted
    lesion slice (qunet.neighbours), and its history says how many."""
    client = app_client(studies, {"features": TINY, "patch_size": "32", "neighbour_labels": "copy"})
    sample = client.post("/activelearning/qunet", json={"client_id": "a"}).json()
    served, depth = sample["slices"], load_stack(str(studies / f"{sample['id']}.nii.gz")).num_slices
    label = np.zeros((48, 48, depth), np.uint8)
    label[10:20, 12:22, served[0]] = 1  # lesion drawn on the first served slice only
    nib.save(nib.Nifti1Image(label, np.diag([0.7, 0.7, 5, 1])), tmp_path / "label.nii.gz")
    with open(tmp_path / "label.nii.gz", "rb") as f:
        r = client.put(
            "/datastore/label",
            params={"image": sample["id"]},
            files={"label": ("label.nii.gz", f)},
            data={"params": '{"client_id": "a"}'},
        )
    assert r.status_code == 200, r.text
    from monailabel.interfaces.utils.app import app_instance

    app = app_instance()
    entry = app._trainers["qunet"]({"max_epochs": 1, "steps_per_epoch": 1, "train_batch_size": 2}, app.datastore())
    neighbours = [k for k in (served[0] - 1, served[0] + 1) if 0 <= k < depth and k not in served]
    assert entry["slices"] == len(served) and entry["neighbour_slices"] == len(neighbours) > 0


def test_fully_labelled_import_leaves_nothing_to_annotate(studies):
    labels = studies / "labels" / "final"
    labels.mkdir(parents=True)
    for f in studies.glob("*.nii.gz"):  # labels present before the app ever served the volume: all slices annotated
        img = nib.load(f)
        nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), labels / f.name)
    client = app_client(studies, {"features": TINY, "patch_size": "32"})
    answer = client.post("/activelearning/qunet", json={"client_id": "a"}).json()
    assert answer["id"] == "" and answer["slices"] == [] and answer["phase"] == "initial"
    assert "train a model" in answer["message"]  # no volume, and why
    assert client.get("/info/").json()["datastore"]["completed"] == 2


@pytest.mark.parametrize("random_strategy", ["qunet", "random"])
def test_random_strategy_setting(studies, random_strategy):
    """OHIF's panel always asks for "random": by default that is the QU-net++ pick, with slices and a hold."""
    client = app_client(
        studies, {"features": TINY, "patch_size": "32", "random_strategy": random_strategy, "pick": "paper"}
    )
    sample = client.post("/activelearning/random", json={"client_id": "ohif"}).json()
    info = client.get("/datastore/image/info", params={"image": sample["id"]}).json()
    if random_strategy == "qunet":
        assert (
            sample["phase"] == "initial"
            and sample["slices"] == info["qunet_quality"]["initial"][: len(sample["slices"])]
        )
        assert info["qunet_served"]["ohif"]["slices"] == sample["slices"]
    else:  # MONAI Label's: a volume, no slices, nothing held
        assert sample["id"] in ("ct1", "ct2") and "slices" not in sample and "qunet_served" not in info
    assert info["strategy"]["random"]["client_id"] == "ohif"


def test_model_changes_are_off_by_default(studies):
    """PUT and DELETE /model/qunet need --conf allow_model_upload true (tests/test_security.py tests them on)."""
    client = app_client(studies, {"features": TINY})
    for method, kwargs in (("PUT", {"files": {"file": ("m.pt", b"any bytes")}}), ("DELETE", {})):
        r = client.request(method, "/model/qunet", **kwargs)
        assert r.status_code == 403 and "allow_model_upload true" in r.json()["detail"], r.text
        assert client.request(method, "/model/nope", **kwargs).status_code == 404
    assert not (studies.parent / "app" / "model" / "qunet.pt").exists()
