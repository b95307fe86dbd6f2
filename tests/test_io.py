import os

import itk
import nibabel as nib
import numpy as np
import pytest

from qunet.annotation import annotated_slices, foreground_slices
from qunet.io import StackError, file_signature, load_label, load_stack, stack_id


@pytest.fixture
def stack_files(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 1000, size=(12, 9, 5)).astype(np.int16)
    affine = np.array([[0, -0.8, 0, 10], [0.7, 0, 0, -5], [0, 0, 2.5, 30], [0, 0, 0, 1]], float)
    nii = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), nii)
    nrrd = tmp_path / "case.nrrd"
    itk.imwrite(itk.imread(str(nii)), str(nrrd))
    return data, affine, nii, nrrd


def test_slice_k_is_the_same_in_nifti_and_nrrd(stack_files):
    data, affine, nii, nrrd = stack_files
    a, b = load_stack(nii), load_stack(nrrd)
    assert a.array.shape == b.array.shape == data.shape
    for k in range(data.shape[2]):
        assert np.array_equal(a.array[:, :, k], data[:, :, k])
        assert np.array_equal(b.array[:, :, k], data[:, :, k])
    assert np.allclose(a.affine, affine, atol=1e-4) and np.allclose(b.affine, affine, atol=1e-4)


def test_label_must_match_shape_geometry_and_values(stack_files, tmp_path):
    data, affine, nii, _ = stack_files
    stack = load_stack(nii)
    good = np.zeros(data.shape, np.uint8)
    good[2:4, 2:4, 1] = 1
    nib.save(nib.Nifti1Image(good, affine), tmp_path / "l.nii.gz")
    assert load_label(tmp_path / "l.nii.gz", stack).sum() == 4
    nib.save(nib.Nifti1Image(good[:, :, :4], affine), tmp_path / "shape.nii.gz")
    with pytest.raises(StackError, match="shape"):
        load_label(tmp_path / "shape.nii.gz", stack)
    nib.save(nib.Nifti1Image(good, np.eye(4)), tmp_path / "geom.nii.gz")
    with pytest.raises(StackError, match="geometry"):
        load_label(tmp_path / "geom.nii.gz", stack)
    nib.save(nib.Nifti1Image(good.astype(np.float32) * -1.5, affine), tmp_path / "neg.nii.gz")
    with pytest.raises(StackError, match="integers from 0 to 255"):
        load_label(tmp_path / "neg.nii.gz", stack)


def test_bad_files_give_clear_errors(tmp_path, stack_files):
    _, affine, nii, _ = stack_files
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    with pytest.raises(StackError, match="empty file"):
        load_stack(tmp_path / "empty.nii.gz")
    (tmp_path / "trunc.nii.gz").write_bytes(nii.read_bytes()[:300])
    with pytest.raises(StackError, match="trunc.nii.gz"):
        load_stack(tmp_path / "trunc.nii.gz")
    (tmp_path / "text.nrrd").write_text("hello")
    with pytest.raises(StackError, match="not a readable image"):
        load_stack(tmp_path / "text.nrrd")
    with pytest.raises(StackError, match="no such file"):
        load_stack(tmp_path / "missing.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((5, 5), np.float32), np.eye(4)), tmp_path / "flat.nii.gz")
    with pytest.raises(StackError, match="3D"):
        load_stack(tmp_path / "flat.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 3, 2), np.float32), np.eye(4)), tmp_path / "multi.nii.gz")
    with pytest.raises(StackError, match="3D"):
        load_stack(tmp_path / "multi.nii.gz")
    nan = np.zeros((5, 5, 3), np.float32)
    nan[1, 1, 1] = np.nan
    nan[2, 2, 2] = np.inf
    nib.save(nib.Nifti1Image(nan, np.eye(4)), tmp_path / "nan.nii.gz")
    with pytest.raises(StackError, match="2 voxels are NaN or infinite"):
        load_stack(tmp_path / "nan.nii.gz")


def test_singleton_fourth_axis_is_a_3d_stack(tmp_path):
    nib.save(nib.Nifti1Image(np.ones((5, 5, 3, 1), np.float32), np.eye(4)), tmp_path / "s.nii.gz")
    assert load_stack(tmp_path / "s.nii.gz").array.shape == (5, 5, 3)


def test_stack_id():
    assert stack_id("/a/b/ct1.nii.gz") == "ct1" and stack_id("x.nrrd") == "x" and stack_id("y.nii") == "y"


def test_annotated_slices_rules():
    label = np.zeros((4, 4, 6), np.uint8)
    label[0, 0, 4] = 1
    assert foreground_slices(label) == [4]
    assert annotated_slices(label, served=[1, 2]) == [1, 2, 4]
    assert annotated_slices(label, previous=[0], served=[1]) == [0, 1, 4]
    assert annotated_slices(label) == list(range(6))  # never served: a fully labelled import
    assert annotated_slices(label, served=[1], declared="all") == list(range(6))
    assert annotated_slices(label, served=[1], declared=[3]) == [3]
    with pytest.raises(ValueError, match="0..5"):
        annotated_slices(label, served=[9])


def test_file_signature_sees_a_same_size_replace_within_one_clock_tick(tmp_path):
    target, other = tmp_path / "model.pt", tmp_path / "new.pt"
    target.write_bytes(b"old weights")
    other.write_bytes(b"new weights")
    st = os.stat(target)
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    before = file_signature(target)
    os.replace(other, target)  # how a model is published
    assert file_signature(target) != before
    assert file_signature(target) == file_signature(target)
