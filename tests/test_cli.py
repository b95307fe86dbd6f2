"""`python -m qunet quality` on real and synthetic stacks, as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from live_server import SAMPLES, TRUTH
from qunet.io import load_stack
from qunet.quality import slice_quality
from qunet.selection import select_initial
from qunet_bench.synthetic import generate_stack


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qunet", *args], capture_output=True, text=True, timeout=300)


def test_quality_on_a_real_stack_and_a_blurred_copy(tmp_path):
    image = sitk.ReadImage(str(SAMPLES / "brain1.nrrd"))
    array = ndimage.gaussian_filter(sitk.GetArrayFromImage(image).astype(np.float32), (0, 1.5, 1.5))  # in-plane
    blurred = sitk.GetImageFromArray(array)
    blurred.CopyInformation(image)
    sitk.WriteImage(blurred, str(tmp_path / "blurred.nrrd"))
    result = run_cli("quality", str(SAMPLES / "brain1.nrrd"), "--roi", str(TRUTH / "brain1.nrrd"))
    assert result.returncode == 0, result.stderr
    sharp = json.loads(result.stdout)
    assert sharp["shape"] == [256, 256, 25] and sharp["roi"] == "mask"
    assert len(sharp["blurriness"]) == 25 and 0 < len(sharp["initial"]) <= 10
    assert all(0 <= k < 25 for k in sharp["initial"])
    soft = json.loads(run_cli("quality", str(tmp_path / "blurred.nrrd")).stdout)
    assert all(b > a for a, b in zip(sharp["blurriness"], soft["blurriness"]))  # blurrier on every slice


def test_quality_cli_reports_unreadable_files(tmp_path):
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b garbage")
    result = run_cli("quality", str(tmp_path / "broken.nii.gz"))
    assert result.returncode == 2
    assert "broken.nii.gz" in result.stderr and "Traceback" not in result.stderr


def test_s0_prefers_sharp_slices_on_generated_stacks():
    picked_blurred = picked = blurred = total = 0
    for kind in ("oct", "ct"):
        for seed in range(3):
            stack = generate_stack(kind, seed)
            initial = select_initial(slice_quality(stack.image))
            picked += len(initial)
            picked_blurred += int((stack.blur_sigma[initial] > 0).sum())
            blurred += int((stack.blur_sigma > 0).sum())
            total += stack.image.shape[2]
    assert picked > 0
    assert picked_blurred / picked < 0.5 * blurred / total  # S0 holds far fewer blurred slices than the stacks


def test_generate_cli_writes_loadable_stacks(tmp_path):
    result = run_cli("generate", str(tmp_path), "--count", "1", "--shape", "48", "48", "8")
    assert result.returncode == 0, result.stderr
    written = json.loads(result.stdout)["written"]
    assert len(written) == 2
    for path in written:
        assert load_stack(path).array.shape == (48, 48, 8)
        assert (tmp_path / "ground-truth" / Path(path).name).exists()
    assert np.isfinite(load_stack(written[0]).array).all()
