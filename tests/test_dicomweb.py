"""qunet.dicomweb against a real Orthanc, read back the way MONAI Label's DICOMweb datastore reads it.

The property that matters: after upload, download and MONAI Label's DICOM-to-NIfTI conversion, slice k
of the NIfTI is slice k of the original file, with the same in-plane orientation and the same affine.
"""

import logging
import os
import re
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicomweb_client.api import DICOMwebClient
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.datastore.utils.convert import dicom_to_nifti, nifti_to_dicom_seg
from monailabel.datastore.utils.dicom import dicom_web_download_series
from orthanc import free_port
from scipy.spatial.transform import Rotation

from qunet.dicomweb import stack_to_series, upload
from qunet.io import Stack, StackError, load_stack

SHAPE = (40, 32, 6)
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
# MONAI Label's DICOM conversions leave their files in the system's temporary folder: here, in each test's own
pytestmark = pytest.mark.usefixtures("system_tmp")


def _affine(left_handed: bool = False) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("xyz", [20, -10, 30], degrees=True).as_matrix() @ np.diag([0.8, 0.9, 2.5])
    affine[:3, 3] = [-12.3, 45.6, 7.8]
    if left_handed:
        affine[:3, 2] *= -1
    return affine


def _volume() -> np.ndarray:
    i, j, k = np.indices(SHAPE)
    # Each slice has its own value range, and the plane is asymmetric, so a reversed, flipped or
    # transposed slice would not compare equal.
    return (1000 * k + 7 * i - 3 * j - 50).astype(np.int16)


def _write_nrrd(volume: np.ndarray, affine: np.ndarray, path: str) -> None:
    image = sitk.GetImageFromArray(volume.transpose(2, 1, 0))  # SimpleITK index (x, y, z) = (i, j, k)
    lps = LPS @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    sitk.WriteImage(image, path)


def converted(folder: Path) -> Stack:
    """MONAI Label's DICOM-to-NIfTI conversion of a folder, read back; the file it writes in the temporary folder
    is removed."""
    path = dicom_to_nifti(str(folder))
    try:
        return load_stack(path)
    finally:
        os.remove(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("stacks")
    paths = {name: str(folder / name) for name in ("stack.nii.gz", "stack.nrrd", "left.nii.gz", "broken.nii.gz")}
    nib.save(nib.Nifti1Image(_volume(), _affine()), paths["stack.nii.gz"])
    _write_nrrd(_volume(), _affine(), paths["stack.nrrd"])
    nib.save(nib.Nifti1Image(_volume(), _affine(left_handed=True)), paths["left.nii.gz"])
    with open(paths["broken.nii.gz"], "wb") as f:
        f.write(b"this is not an image")
    return paths


@pytest.fixture(scope="module")
def uploaded(orthanc_server, files) -> dict[str, str]:
    uids = upload([files["stack.nii.gz"], files["stack.nrrd"]], orthanc_server)
    return {"stack.nii.gz": uids[0], "stack.nrrd": uids[1]}


@pytest.fixture(scope="module")
def datastore(orthanc_server, tmp_path_factory) -> DICOMWebDatastore:
    # As MonaiLabelApp._init_dicomweb_datastore builds it for `--studies http://.../dicom-web`
    return DICOMWebDatastore(
        DICOMwebClientX(url=orthanc_server), {"Modality": "CT"}, cache_path=str(tmp_path_factory.mktemp("cache"))
    )


@pytest.fixture
def dcmqi_on_path(monkeypatch):
    # MONAI Label runs `itkimage2segimage` from PATH; dcmqi's wheel puts it next to this interpreter.
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])


def test_files_agree(files):
    nii, nrrd = load_stack(files["stack.nii.gz"]), load_stack(files["stack.nrrd"])
    assert np.array_equal(nii.array, _volume()) and np.array_equal(nrrd.array, _volume())
    assert np.allclose(nii.affine, _affine(), atol=1e-5) and np.allclose(nrrd.affine, _affine(), atol=1e-5)


def test_series_layout(files):
    series = stack_to_series(files["stack.nii.gz"])
    volume, affine = _volume(), LPS @ _affine()
    assert len(series) == SHAPE[2]
    for k, ds in enumerate(series):
        assert ds.InstanceNumber == k + 1
        assert (ds.Rows, ds.Columns) == (SHAPE[1], SHAPE[0])
        assert np.array_equal(ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept), volume[:, :, k].T)
        assert np.allclose(np.array(ds.ImagePositionPatient, float), affine[:3, :3] @ [0, 0, k] + affine[:3, 3])
        directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
        assert np.allclose(np.array(ds.ImageOrientationPatient, float), directions[:, :2].T.ravel())
        assert np.allclose([*ds.PixelSpacing, ds.SliceThickness, ds.SpacingBetweenSlices], [0.9, 0.8, 2.5, 2.5])
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and ds.Modality == "CT" and ds.PatientID == "stack"
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert len({ds[key].value for ds in series}) == 1
    assert len({ds.SOPInstanceUID for ds in series}) == SHAPE[2]
    uids = [ds[key].value for ds in series for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]
    assert all(pydicom.uid.UID(uid).is_valid for uid in uids)

    again = stack_to_series(files["stack.nii.gz"])
    assert [ds.SOPInstanceUID for ds in again] == [ds.SOPInstanceUID for ds in series]
    mr = stack_to_series(files["stack.nii.gz"], modality="MR")
    assert mr[0].SOPClassUID == "1.2.840.10008.5.1.4.1.1.4" and mr[0].SeriesInstanceUID != series[0].SeriesInstanceUID


def test_float_stack_round_trips_within_rescale_step(tmp_path):
    volume = np.random.default_rng(0).normal(100, 300, SHAPE).astype(np.float32)
    path = str(tmp_path / "float.nii.gz")
    nib.save(nib.Nifti1Image(volume, _affine()), path)
    (tmp_path / "dcm").mkdir()
    series = stack_to_series(path)
    for ds in series:
        ds.save_as(str(tmp_path / "dcm" / f"{ds.SOPInstanceUID}.dcm"))
    back = converted(tmp_path / "dcm")
    step = float(series[0].RescaleSlope)
    assert step < 0.1
    assert np.abs(back.array - volume).max() <= step / 2 + 1e-3
    assert np.allclose(back.affine, _affine(), atol=1e-4)


def test_upload_is_listed(orthanc_server, uploaded):
    client = DICOMwebClient(orthanc_server)
    assert uploaded["stack.nii.gz"] != uploaded["stack.nrrd"]
    for uid in uploaded.values():
        [found] = client.search_for_series(search_filters={"SeriesInstanceUID": uid, "Modality": "CT"})
        assert found["00201209"]["Value"] == [SHAPE[2]]  # NumberOfSeriesRelatedInstances
        study = found["0020000D"]["Value"][0]
        instances = client.search_for_instances(study_instance_uid=study, series_instance_uid=uid)
        assert sorted(ds["00200013"]["Value"][0] for ds in instances) == list(range(1, SHAPE[2] + 1))


@pytest.mark.parametrize("name", ["stack.nii.gz", "stack.nrrd"])
def test_monailabel_image_keeps_slice_order(datastore, uploaded, files, name):
    uid = uploaded[name]
    assert uid in datastore.list_images()
    original = load_stack(files[name])
    for path in (datastore.get_image_uri(uid), datastore.get_image_uri(uid)):  # converted, then cached
        served = load_stack(path)
        assert served.array.shape == SHAPE
        for k in range(SHAPE[2]):
            assert np.array_equal(served.array[:, :, k], original.array[:, :, k]), f"slice {k}"
        assert np.allclose(served.affine, original.affine, atol=1e-4)
    assert os.path.basename(path) == f"{uid}.nii.gz"  # the cached copy is named after the series


def test_left_handed_stack_keeps_its_slices_with_rows_reversed(orthanc_server, files, tmp_path):
    """ITK returns a right-handed grid: slice k stays slice k, axis j comes back reversed, each voxel in place."""
    original = load_stack(files["left.nii.gz"])
    assert np.linalg.det(original.affine[:3, :3]) < 0
    (tmp_path / "dcm").mkdir()
    for ds in stack_to_series(files["left.nii.gz"]):
        ds.save_as(str(tmp_path / "dcm" / f"{ds.SOPInstanceUID}.dcm"))
    back = converted(tmp_path / "dcm")
    assert back.array.shape == SHAPE
    for k in range(SHAPE[2]):
        assert np.array_equal(back.array[:, :, k], original.array[:, ::-1, k]), f"slice {k}"
    reverse_j = np.eye(4)
    reverse_j[1, 1], reverse_j[1, 3] = -1, SHAPE[1] - 1  # voxel (i, j, k) -> (i, J-1-j, k)
    assert np.allclose(back.affine, original.affine @ reverse_j, atol=1e-4)  # the same place in the patient
    [uid] = upload([files["left.nii.gz"]], orthanc_server)
    assert DICOMwebClient(orthanc_server).search_for_series(search_filters={"SeriesInstanceUID": uid})


def test_reupload_keeps_one_copy(orthanc_server, uploaded, files):
    client = DICOMwebClient(orthanc_server)
    before = len(client.search_for_series())
    assert upload([files["stack.nii.gz"]], orthanc_server) == [uploaded["stack.nii.gz"]]
    assert len(client.search_for_series()) == before
    [found] = client.search_for_series(search_filters={"SeriesInstanceUID": uploaded["stack.nii.gz"]})
    assert found["00201209"]["Value"] == [SHAPE[2]]  # NumberOfSeriesRelatedInstances


def _seg_slices(seg_file: str, series_dir: str) -> dict[int, set[int]]:
    """Segment number -> slice indices k of the source series its frames point at."""
    slice_of = {}
    for name in os.listdir(series_dir):
        ds = pydicom.dcmread(os.path.join(series_dir, name), stop_before_pixels=True)
        slice_of[ds.SOPInstanceUID] = ds.InstanceNumber - 1
    found: dict[int, set[int]] = {}
    for frame in pydicom.dcmread(seg_file).PerFrameFunctionalGroupsSequence:
        segment = frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        source = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        found.setdefault(segment, set()).add(slice_of[source])
    return found


@pytest.mark.filterwarnings("ignore:No bulk data URI handler")  # MONAI Label reads series metadata without pixels
def test_series_makes_valid_dicom_seg(orthanc_server, uploaded, files, datastore, tmp_path, dcmqi_on_path, caplog):
    caplog.set_level(logging.INFO, logger="monailabel")
    uid = uploaded["stack.nii.gz"]
    series_dir = str(tmp_path / "series")
    dicom_web_download_series(None, uid, series_dir, DICOMwebClientX(url=orthanc_server))
    names = os.listdir(series_dir)
    assert len(names) == SHAPE[2]
    for name in names:
        for element in pydicom.dcmread(os.path.join(series_dir, name)).iterall():
            if element.VR == "DS":
                values = element.value if element.VM > 1 else [element.value]
                assert all(len(str(v)) <= 16 for v in values), f"{element.keyword} = {element.value}"

    label = np.zeros(SHAPE, np.uint8)
    label[5:20, 3:9, 2] = 1
    label[10:12, 20:30, 4] = 2
    label_path = str(tmp_path / "label.nii.gz")
    nib.save(nib.Nifti1Image(label, _affine()), label_path)
    seg = nifti_to_dicom_seg(series_dir, label_path, [{"name": "lesion"}, {"name": "edema"}])
    assert os.path.isfile(seg) and os.path.getsize(seg) > 0, f"itkimage2segimage failed:\n{caplog.text[-3000:]}"
    assert pydicom.dcmread(seg).ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    assert _seg_slices(seg, series_dir) == {1: {2}, 2: {4}}
    os.unlink(seg)

    # MONAI Label's own save of a final label: SEG made by dcmqi, sent back over STOW-RS
    datastore.save_label(uid, label_path, "final", {"label_info": [{"name": "lesion"}, {"name": "edema"}]})
    segs = DICOMwebClient(orthanc_server).search_for_series(search_filters={"Modality": "SEG"})
    assert len(segs) == 1, f"no SEG stored:\n{caplog.text[-3000:]}"
    assert uid in datastore.get_labeled_images()


def test_unreachable_server_is_named(files):
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    with pytest.raises(ConnectionError, match=re.escape(url)):
        upload([files["stack.nii.gz"]], url)


def test_unreadable_file_is_named(orthanc_server, files, tmp_path):
    with pytest.raises(StackError, match="broken.nii.gz"):
        upload([files["broken.nii.gz"]], orthanc_server)
    with pytest.raises(StackError, match="missing.nrrd"):
        upload([str(tmp_path / "missing.nrrd")], orthanc_server)
