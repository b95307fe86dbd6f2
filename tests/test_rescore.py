"""The re-scoring benchmark (`python -m qunet rescore`) at tiny sizes: a round of Next sample, label, Train on a
live server, then the seconds until a disagreement-phase sample and until everything is re-scored. No speed is
asserted; the figures must be there and in order, and training must not log MONAI Label's scoring-trigger error."""

import json

import nibabel as nib
import numpy as np

from qunet.__main__ import main
from qunet_bench.synthetic import generate_stack


def test_rescore_bench_one_round(tmp_path, capsys):
    data = tmp_path / "data"
    (data / "ground-truth").mkdir(parents=True)
    for i, kind in enumerate(("ct", "oct", "ct")):
        stack = generate_stack(kind, 20 + i, (48, 48, 24))  # the default pick serves up to an eighth: 3 slices
        affine = np.diag([0.8, 0.8, 4.0, 1.0])
        nib.save(nib.Nifti1Image(stack.image.astype(np.int16), affine), data / f"{kind}{i}.nii.gz")
        nib.save(nib.Nifti1Image(stack.label.astype(np.uint8), affine), data / "ground-truth" / f"{kind}{i}.nii.gz")
    out = tmp_path / "rescore.json"
    assert (
        main(
            [
                "rescore",
                "--data",
                str(data),
                "--rounds",
                "1",
                "--samples",
                "1",
                "--out",
                str(out),
                "--conf",
                "patch_size=32",
                "features=4,4,8,8,16,4",
                "q0=1.01",
                "slices_per_sample=3",
                "--train",
                "max_epochs=2",
                "steps_per_epoch=5",
                "train_batch_size=4",
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert [r["round"] for r in result["rounds"]] == [1] and result["volumes"] == 3
    assert [r["annotated_slices"] for r in result["rounds"]] == [3]
    for r in result["rounds"]:
        assert 0 < r["seconds_to_first_disagreement_sample"] <= r["seconds_to_rescore_all"]
        assert sorted(r["order"]) == ["ct0", "ct2", "oct1"] and r["scored"] == 3 and r["slices_per_second"] > 0
    assert result["failed_to_trigger_logged"] is False
    assert "Train done -> first disagreement-phase Next sample" in capsys.readouterr().out
