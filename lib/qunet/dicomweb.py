"""Turn 3D stacks into DICOM series and send them to a DICOMweb server (e.g. Orthanc) for MONAI Label.

MONAI Label's DICOMweb datastore downloads a series and converts it to NIfTI with SimpleITK's
ImageSeriesReader (`monailabel.datastore.utils.convert.dicom_to_nifti`). That reader sorts slices by
position along the normal row x column and gives the NIfTI the voxel order (column, row, slice).
The series written here is laid out so that this conversion gives back the stack's own voxel order:
slice k of the NIfTI is slice k of the file (`qunet.io` convention), with the same affine.

ITK always returns a right-handed grid, so a left-handed stack (axis k against i x j, as in radiological-order
NIfTI files) cannot come back unchanged. Its series is written with axis j reversed instead: slice k is still
slice k, each with its rows in reverse order and the affine changed to match, so every voxel keeps its place
in the patient (and in any viewer).
"""

import hashlib
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from qunet.io import StackError, load_stack, stack_id

SOP_CLASSES = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def _ds(value: float) -> str:
    """A Decimal String value, at most 16 characters as the standard requires (str(float) often has 17+)."""
    return format_number_as_ds(float(value))


def _geometry(affine: np.ndarray, path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unit directions (LPS) of the i, j, k voxel axes, and the voxel spacing."""
    lps = RAS_TO_LPS @ affine[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    if np.any(spacing < 1e-9):
        raise StackError(f"{path}: degenerate affine (a voxel axis has zero length)")
    di, dj, dk = (lps / spacing).T
    if max(abs(di @ dj), abs(di @ dk), abs(dj @ dk)) > 1e-4:
        raise StackError(f"{path}: sheared voxel grid (axes not orthogonal) cannot be written as a DICOM series")
    return di, dj, dk, spacing


def _pixels(array: np.ndarray) -> tuple[np.ndarray, str, str]:
    """Stored values and Rescale (slope, intercept) as DS strings such that slope * stored + intercept ~ array.

    Integer-valued stacks that fit 16 bits are kept exactly; anything else is spread over uint16.
    """
    lo, hi = float(array.min()), float(array.max())
    if np.array_equal(array, np.round(array)):
        if lo >= -(2**15) and hi < 2**15:
            return array.astype(np.int16), "1", "0"
        if lo >= 0 and hi < 2**16:
            return array.astype(np.uint16), "1", "0"
    intercept = _ds(lo)
    slope = _ds((hi - lo) / 65535) if hi > lo else "1"
    # Quantise with the values as written, so the reader's rescale is the exact inverse up to one step.
    stored = np.round((array.astype(np.float64) - float(intercept)) / float(slope))
    return np.clip(stored, 0, 65535).astype(np.uint16), slope, intercept


def stack_to_series(
    path: str | Path,
    modality: str = "CT",
    patient_id: str | None = None,
    series_description: str | None = None,
) -> list[pydicom.Dataset]:
    """One DICOM instance per slice k (InstanceNumber k + 1) of the stack in `path`.

    UIDs derive from the file's bytes, name and these arguments, so uploading the same file again
    names the same instances and the server keeps one copy.
    """
    if modality not in SOP_CLASSES:
        raise ValueError(f"modality must be one of {sorted(SOP_CLASSES)}, not {modality!r}")
    stack = load_stack(path)
    name = stack_id(path)
    patient_id = patient_id or name
    series_description = series_description or name
    di, dj, dk, spacing = _geometry(stack.affine, str(path))
    origin = RAS_TO_LPS @ stack.affine[:3, 3]
    stored, slope, intercept = _pixels(stack.array)
    if np.cross(di, dj) @ dk < 0:  # left-handed: reverse axis j (see the module docstring)
        origin = origin + (stored.shape[1] - 1) * spacing[1] * dj
        dj, stored = -dj, stored[:, ::-1, :]

    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    seed = [digest, name, modality, patient_id, series_description]
    study_uid, series_uid, frame_uid = (
        generate_uid(entropy_srcs=seed + [kind]) for kind in ("study", "series", "frame")
    )
    now = datetime.now()
    sop_class = SOP_CLASSES[modality]

    series = []
    for k in range(stack.num_slices):
        sop_uid = generate_uid(entropy_srcs=seed + ["instance", str(k)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = FileDataset(f"{name}_{k:04d}.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
        ds.is_little_endian, ds.is_implicit_VR = True, False

        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.InstanceCreationDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.InstanceCreationTime = ds.ContentTime = now.strftime("%H%M%S")
        # Patient and study (type 2 attributes present, empty where unknown)
        ds.PatientName, ds.PatientID = patient_id, patient_id
        ds.PatientBirthDate, ds.PatientSex = "", ""
        ds.StudyInstanceUID, ds.StudyID, ds.AccessionNumber = study_uid, "1", ""
        ds.StudyDate, ds.StudyTime = ds.ContentDate, ds.ContentTime
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "QU-net++ upload"
        # Series and equipment
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = modality, series_uid, 1
        ds.SeriesDescription = series_description
        ds.Manufacturer = "qunet"
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_uid, ""
        ds.InstanceNumber = k + 1
        if modality == "CT":
            ds.KVP, ds.AcquisitionNumber = "", 1
        else:
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "RM", "NONE", ""
            ds.MRAcquisitionType, ds.EchoTrainLength = "", ""
            ds.RepetitionTime, ds.EchoTime, ds.InversionTime = "", "", ""
        # Geometry: DICOM columns run along i and rows along j, so pixel (row r, column c) = array[c, r, k].
        ds.ImagePositionPatient = [_ds(v) for v in origin + k * spacing[2] * dk]
        ds.ImageOrientationPatient = [_ds(v) for v in (*di, *dj)]
        ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]  # row spacing (along j), column spacing (along i)
        ds.SliceThickness = ds.SpacingBetweenSlices = _ds(spacing[2])
        # Pixels
        plane = np.ascontiguousarray(stored[:, :, k].T)
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1 if stored.dtype == np.int16 else 0
        # Rescale is a CT attribute, but ITK (hence MONAI Label) applies it to MR instances too.
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "US"
        ds.PixelData = plane.tobytes()
        series.append(ds)
    return series


def upload(paths: Iterable[str | Path], url: str, modality: str = "CT") -> list[str]:
    """STOW-RS each stack to the DICOMweb root `url` (e.g. http://127.0.0.1:8042/dicom-web); SeriesInstanceUIDs.

    Stacks go one by one: after an error the earlier ones are stored, and sending them again is harmless.
    """
    client = DICOMwebClient(url=url)
    # By default it retries a refused connection with back-off for ~30 s; failing at once is clearer, and
    # re-running an upload is harmless.
    client.set_http_retry_params(retry=False)
    uids = []
    for path in paths:
        series = stack_to_series(path, modality=modality)
        try:
            response = client.store_instances(series)
        except requests.ConnectionError as e:
            raise ConnectionError(f"cannot reach the DICOMweb server at {url}: {e}") from e
        except requests.HTTPError as e:
            raise RuntimeError(f"the DICOMweb server at {url} rejected {path}: {e}") from e
        failed = response.get("FailedSOPSequence") or []
        if failed:
            raise RuntimeError(f"the DICOMweb server at {url} refused {len(failed)} of {len(series)} slices of {path}")
        uids.append(str(series[0].SeriesInstanceUID))
    return uids
