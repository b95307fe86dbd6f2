"""The app over DICOMweb: a real Orthanc, `monailabel start_server --studies http://.../dicom-web`, MONAILabelClient.

The same loop as test_app_live.py (which uses a local folder), on a synthetic CT-like stack (NIfTI, uploaded
as CT) and the real pyradiomics breast1 MRI (NRRD, uploaded as MR: the search filter lists both modalities):
Next sample, download, Submit label (stored on Orthanc as DICOM SEG), Train, disagreement scores, Next sample,
Infer. Slice k of what the server hands out must be slice k of the uploaded file, and labels read back from
the SEG (which dcmqi crops to the labelled slices) must land on the image's grid.
"""

import json
import os
import sys
import time
from pathlib import Path
from urllib.parse import quote_plus

import nibabel as nib
import numpy as np
import pydicom
import pydicom.uid
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from monailabel.client import MONAILabelClient

from live_server import SAMPLES, TRUTH, LiveServer, draw_truth, wait_for
from orthanc import seg_slices, segs_of
from qunet.dicomweb import upload
from qunet.config import ReadConfig
from qunet.io import file_signature, load_label, load_stack, set_read_config
from qunet_bench.synthetic import generate_stack

# pick: the paper's order, which the assertions below check (S0 best quality first, then the lowest Q)
TINY_CONF = {"patch_size": "32", "features": "8,8,16,16,32,8", "slices_per_sample": "4", "q0": "1.01", "pick": "paper"}
TRAIN = {"max_epochs": 2, "steps_per_epoch": 4, "train_batch_size": 4}
CLIENT = "ohif-a"


@pytest.fixture(scope="module")
def data(tmp_path_factory, orthanc_server) -> dict:
    """Two stacks uploaded to Orthanc: SeriesInstanceUID -> its original file, ground truth and modality."""
    root = tmp_path_factory.mktemp("dicomweb")
    ct = generate_stack("ct", seed=3, shape=(64, 64, 12))
    affine = np.diag([0.7, 0.7, 5.0, 1.0])
    nib.save(nib.Nifti1Image(ct.image.astype(np.int16), affine), root / "ct3.nii.gz")
    nib.save(nib.Nifti1Image(ct.label.astype(np.uint8), affine), root / "ct3-truth.nii.gz")
    [ct_uid] = upload([root / "ct3.nii.gz"], orthanc_server, modality="CT")
    [mr_uid] = upload([SAMPLES / "breast1.nrrd"], orthanc_server, modality="MR")
    stacks = {
        ct_uid: {"file": root / "ct3.nii.gz", "truth": root / "ct3-truth.nii.gz", "modality": "CT"},
        mr_uid: {"file": SAMPLES / "breast1.nrrd", "truth": TRUTH / "breast1.nrrd", "modality": "MR"},
    }
    return {"root": root, "url": orthanc_server, "stacks": stacks}


@pytest.fixture(scope="module")
def server(data):
    venv_bin = os.path.dirname(sys.executable)  # monailabel and dcmqi's itkimage2segimage
    env = {
        "PATH": venv_bin + os.pathsep + os.environ["PATH"],
        "MONAI_LABEL_DICOMWEB_SEARCH_FILTER": json.dumps({"Modality": ["CT", "MR"]}),
        "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(data["root"] / "cache"),
    }
    srv = LiveServer(data["url"], data["root"], conf=TINY_CONF, env=env).start()
    yield srv
    srv.stop()
    print(srv.tail(40))


def fetch_label(server: LiveServer, image_id: str, image, dest: Path) -> np.ndarray:
    """The image's final label as the server hands it out, checked to lie on the image's grid."""
    r = requests.get(f"{server.url}/datastore/label", params={"label": image_id, "tag": "final"}, timeout=60)
    assert r.ok, r.text
    dest.write_bytes(r.content)
    return load_label(dest, image)


def download_image(server: LiveServer, image_id: str, dest: Path) -> Path:
    r = requests.get(f"{server.url}/datastore/image?image={quote_plus(image_id)}", timeout=60)
    assert r.ok, r.text
    dest.write_bytes(r.content)
    return dest


def test_images_are_the_uploaded_series(server, data):
    info = MONAILabelClient(server.url).info()
    assert "qunet" in info["models"] and "qunet" in info["strategies"]
    assert {"qunet_quality", "qunet_disagreement"} <= set(info["scoring"])
    for uid, stack in data["stacks"].items():
        record = wait_for(lambda: server.image_info(uid).get("qunet_quality"), 120, f"quality scores of {uid}")
        assert record["slices"] == load_stack(stack["file"]).num_slices
        meta = server.image_info(uid)
        assert meta["Modality"] == stack["modality"] and meta["SeriesInstanceUID"] == uid
        assert meta["DicomPatientID"] == Path(stack["file"]).name.split(".")[0]
    # a series that is not on the server is a 404-like error, not a crash or a path outside the cache
    r = requests.get(f"{server.url}/datastore/image?image=..%2F..%2Fetc", timeout=30)
    assert not r.ok


def test_dicomweb_loop(server, data, tmp_path):
    client = MONAILabelClient(server.url, client_id=CLIENT)
    url, stacks = data["url"], data["stacks"]
    annotated: dict[str, set[int]] = {}
    for round_ in (1, 2):
        sample = client.next_sample("qunet", {})
        image_id, slices = sample["id"], sample["slices"]
        assert image_id in stacks
        stack = stacks[image_id]
        original = load_stack(stack["file"])
        assert sample["phase"] == ("initial" if round_ == 1 else "disagreement")
        assert 0 < len(slices) <= 4 and all(isinstance(k, int) and 0 <= k < original.num_slices for k in slices)
        assert not set(slices) & annotated.get(image_id, set()), "served an annotated slice again"
        # OHIF's Next sample dialog shows PatientID and opens StudyInstanceUID; Slicer names the volume after PatientID
        assert sample["PatientID"].startswith(image_id) and str(slices[0]) in sample["PatientID"]
        assert sample["StudyInstanceUID"] == server.image_info(image_id)["StudyInstanceUID"]
        if round_ == 1:
            assert slices == server.image_info(image_id)["qunet_quality"]["initial"][: len(slices)]
        else:
            assert sample["scores"]["q"] == sorted(sample["scores"]["q"])

        # the image as a client downloads it: slice k is slice k of the uploaded file, same geometry
        image_file = download_image(server, image_id, tmp_path / f"{round_}-{image_id}.nii.gz")
        served = load_stack(image_file)
        assert served.array.shape == original.array.shape
        for k in range(original.num_slices):
            assert np.array_equal(served.array[:, :, k], original.array[:, :, k]), f"slice {k}"
        assert np.allclose(served.affine, original.affine, atol=1e-4)

        label_file = tmp_path / f"{round_}-{image_id}-label.nii.gz"
        drawn = draw_truth(stack["truth"], image_file, slices, label_file)
        before = len(segs_of(url, image_id))
        saved = client.save_label(image_id, str(label_file), params={"label_info": [{"name": "lesion", "idx": 1}]})
        assert set(saved["annotated_slices"]) == set(slices) | annotated.get(image_id, set())
        annotated[image_id] = set(saved["annotated_slices"])

        # stored on Orthanc as a DICOM SEG of that series, cropped by dcmqi to the slices from the first to the
        # last with foreground (the served slices' drawing merged with earlier ones); a label without foreground
        # cannot be a SEG. Whether
        # the served slices show lesion depends on the pick: test_ohif_binary_label always makes a SEG.
        segs = segs_of(url, image_id)
        truth = load_stack(stack["truth"]).array > 0
        with_foreground = sorted(k for k in annotated[image_id] if truth[:, :, k].any())
        if with_foreground:
            assert len(segs) == before + 1, "no SEG stored for a label with foreground"
            seg = max(segs, key=lambda s: (s.SeriesDate, s.SeriesTime))
            assert seg.SegmentSequence[0].SegmentLabel == "lesion"
            # its frames point at the instances of the labelled slices: InstanceNumber k + 1 for slice k
            assert seg_slices(url, image_id, seg) == set(range(with_foreground[0], with_foreground[-1] + 1))
        else:
            assert len(segs) == before, "dcmqi cannot write a SEG without foreground: kept in the app's cache"
        # ... and read back from the server on the image's grid, equal to what was drawn on the annotated slices
        r = requests.get(f"{server.url}/datastore/label", params={"label": image_id, "tag": "final"}, timeout=60)
        assert r.ok, r.text
        back_file = tmp_path / f"{round_}-{image_id}-back.nii.gz"
        back_file.write_bytes(r.content)
        back = load_label(back_file, served)  # raises unless shape and affine equal the image's
        for k in set(slices):
            assert np.array_equal(back[:, :, k], drawn[:, :, k]), f"label slice {k} after the SEG round trip"
        if with_foreground:
            frames = int(seg.NumberOfFrames)
            assert frames < original.num_slices  # cropped on the server: resampling put it back on the grid

        client.train_start("qunet", TRAIN)
        status = wait_for(
            lambda: (s := client.train_status()) and s.get("status") in ("DONE", "ERROR") and s, 300, "training"
        )
        assert status["status"] == "DONE", server.tail()
        r = requests.post(f"{server.url}/scoring/qunet_disagreement", timeout=30)
        assert r.status_code in (200, 429)  # 429: the post-training scoring is still running
        model = file_signature(Path(server.app_dir, "model", "qunet.pt"))
        record = wait_for(
            lambda: (
                (scores := server.image_info(image_id).get("qunet_disagreement") or {}).get("model") == model and scores
            ),
            300,
            "disagreement scores of the new model",
        )
        assert len(record["q"]) == original.num_slices
        assert all(record["q"][k] is None for k in annotated[image_id])  # annotated slices are not scored

    sample = client.next_sample("qunet", {})
    assert sample["phase"] == "disagreement"
    assert not set(sample["slices"]) & annotated.get(sample["id"], set())


def test_infer_on_a_series(server, data, tmp_path):
    assert Path(server.app_dir, "model", "qunet.pt").exists(), "runs after the loop test, which trains"
    for image_id, stack in data["stacks"].items():
        # MONAILabelClient.infer saves the answer under the server's own temporary file name, which the server
        # deletes after answering: on one machine the file can vanish. Read the answer directly.
        r = requests.post(
            f"{server.url}/infer/qunet",
            params={"image": image_id, "output": "image"},
            data={"params": "{}"},
            timeout=300,
        )
        assert r.ok, r.text
        label_file = tmp_path / f"{image_id}-infer.nii.gz"
        label_file.write_bytes(r.content)
        image = load_stack(stack["file"])
        label = load_label(label_file, image)  # raises unless shape and affine equal the uploaded file's
        assert label.shape == image.array.shape and set(np.unique(label)) <= {0, 1}


def test_ohif_binary_label(server, data, tmp_path):
    """OHIF's panel submits label.bin: the raw voxels of the image's grid (x fastest); stored as a SEG too."""
    image_id = next(i for i, s in data["stacks"].items() if s["modality"] == "CT")
    stack = data["stacks"][image_id]
    image_file = download_image(server, image_id, tmp_path / "image.nii.gz")
    image = load_stack(image_file)
    truth = load_stack(stack["truth"]).array
    labelled = [int(k) for k in np.nonzero(truth.any(axis=(0, 1)))[0]][-2:]
    drawn = draw_truth(stack["truth"], image_file, labelled, tmp_path / "drawn.nii.gz")
    earlier = set(server.image_info(image_id).get("qunet_annotated") or [])  # the loop test may have labelled it
    earlier_label = fetch_label(server, image_id, image, tmp_path / "earlier.nii.gz") if earlier else None
    before = len(segs_of(data["url"], image_id))
    r = requests.put(
        f"{server.url}/datastore/label",
        params={"image": image_id},
        data={"params": json.dumps({"label_info": [{"name": "lesion", "idx": 1}]})},
        files={"label": ("label.bin", drawn.tobytes(order="F"))},
        timeout=120,
    )
    assert r.ok, r.text
    assert set(labelled) | earlier <= set(r.json()["annotated_slices"])
    back = fetch_label(server, image_id, image, tmp_path / "back.nii.gz")
    for k in range(image.num_slices):
        # an earlier annotated slice keeps its content unless this submission covers it (the slices served
        # last); every other slice is what was submitted now
        now = np.array_equal(back[:, :, k], drawn[:, :, k])
        kept = k in earlier and np.array_equal(back[:, :, k], earlier_label[:, :, k])
        assert now or kept, f"slice {k}"
    # the SEG (cropped by dcmqi from the first to the last slice with foreground) holds the merged label
    segs = segs_of(data["url"], image_id)
    assert len(segs) == before + 1
    newest = max(segs, key=lambda s: (s.SeriesDate, s.SeriesTime))
    foreground = np.nonzero(back.any(axis=(0, 1)))[0]
    assert seg_slices(data["url"], image_id, newest) == set(range(foreground.min(), foreground.max() + 1))
    # the conversions (raw voxels to NIfTI, NIfTI to SEG) stay in the server's own folder (qunet_app.server.tempfolder)
    assert os.listdir(Path(server.app_dir).parent / "tmp") == []


def test_datastore_in_process(data):
    """The datastore class itself: SEG series are never images, whatever the search filter."""
    app_dir = str(Path(__file__).resolve().parents[1] / "apps" / "qunet")
    saved = {k: v for k, v in sys.modules.items() if k == "qunet_app" or k.startswith("qunet_app.")}
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, app_dir)
    try:
        from qunet_app.datastore.dicomweb import DICOMwebClientX, QUNetDICOMWebDatastore

        store = QUNetDICOMWebDatastore(
            DICOMwebClientX(url=data["url"]), {}, cache_path=str(data["root"] / "cache2"), labels={"lesion": 1}
        )
        assert any(segs_of(data["url"], i) for i in data["stacks"]), "runs after tests that store SEGs"
        assert sorted(store.list_images()) == sorted(data["stacks"])  # no SEG among them
        labelled = store.get_labeled_images()
        assert labelled and set(labelled) <= set(data["stacks"])
        # a fresh cache (another server, or one restarted elsewhere) reads the labels back from the SEGs
        for image_id in labelled:
            label = load_label(store.get_label_uri(image_id, "final"), load_stack(store.get_image_uri(image_id)))
            assert label.any()
        with pytest.raises(Exception, match="not found"):
            store.get_image_uri("../../etc")

        # what the server holds is untrusted too: SEG UIDs name cache files, and headers decide memory
        client = DICOMwebClient(data["url"])
        image_id = labelled[0]
        stored = segs_of(data["url"], image_id)[0]
        [seg] = client.retrieve_series(stored.StudyInstanceUID, stored.SeriesInstanceUID)
        seg.SeriesInstanceUID, seg.SOPInstanceUID = "1.2/../../../../escaped", pydicom.uid.generate_uid()
        client.store_instances([seg])
        fresh = QUNetDICOMWebDatastore(
            DICOMwebClientX(url=data["url"]), {}, cache_path=str(data["root"] / "cache3"), labels={"lesion": 1}
        )
        assert image_id in fresh.get_labeled_images()
        assert load_label(fresh.get_label_uri(image_id, "final"), load_stack(fresh.get_image_uri(image_id))).any()
        assert not list(data["root"].parent.rglob("escaped*")), "a file named after the hostile UID"
        from qunet_app.server.errors import InvalidFile

        set_read_config(ReadConfig(max_voxels=1000))  # below either stack's voxels: the series is refused unread
        capped = QUNetDICOMWebDatastore(
            DICOMwebClientX(url=data["url"]), {}, cache_path=str(data["root"] / "cache4"), labels={"lesion": 1}
        )
        with pytest.raises(InvalidFile, match="more than the limit of 1,000"):
            capped.get_image_uri(image_id)
    finally:
        set_read_config(ReadConfig())
        sys.path.remove(app_dir)
        for k in [k for k in sys.modules if k == "qunet_app" or k.startswith("qunet_app.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def test_seg_made_elsewhere_is_read_on_the_grid(server, data, tmp_path):
    """A SEG stored on the server by another tool (e.g. a viewer) becomes the image's label, on its grid."""
    from monailabel.datastore.dicom import DICOMwebClientX
    from monailabel.datastore.utils.convert import nifti_to_dicom_seg
    from monailabel.datastore.utils.dicom import dicom_web_download_series

    image_id = next(i for i, s in data["stacks"].items() if s["modality"] == "CT")
    stack = data["stacks"][image_id]
    series_dir = tmp_path / "series"
    dicom_web_download_series(None, image_id, str(series_dir), DICOMwebClientX(url=data["url"]))
    image_file = download_image(server, image_id, tmp_path / "image.nii.gz")
    truth = load_stack(stack["truth"]).array
    labelled = sorted(int(k) for k in np.nonzero(truth.any(axis=(0, 1)))[0])[:3]
    assert labelled, "the synthetic stack has lesions"
    drawn = draw_truth(stack["truth"], image_file, labelled, tmp_path / "elsewhere.nii.gz")
    time.sleep(1.1)  # SEG times have one-second steps: be newer than the app's last one
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    old_path, os.environ["PATH"] = os.environ["PATH"], env["PATH"]
    try:
        seg_file = nifti_to_dicom_seg(str(series_dir), str(tmp_path / "elsewhere.nii.gz"), [{"name": "lesion"}])
    finally:
        os.environ["PATH"] = old_path
    seg = pydicom.dcmread(seg_file)
    os.remove(seg_file)  # MONAI Label writes it to the system's temporary folder
    assert int(seg.NumberOfFrames) == max(labelled) - min(labelled) + 1 < load_stack(image_file).num_slices
    DICOMwebClient(data["url"]).store_instances([seg])

    def fetched():
        r = requests.get(f"{server.url}/datastore/label", params={"label": image_id, "tag": "final"}, timeout=60)
        assert r.ok, r.text
        (tmp_path / "back.nii.gz").write_bytes(r.content)
        back = load_label(tmp_path / "back.nii.gz", load_stack(image_file))
        return np.array_equal(back, drawn)

    wait_for(fetched, 30, "the new SEG as the image's label")
