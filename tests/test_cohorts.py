"""Cohorts that tell slice-picking methods apart: realistic lesion prevalence, and lesions inserted into real scans."""

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from live_server import SAMPLES, TRUTH
from qunet_bench.cohorts import PREVALENCE, plan_spans, prevalence_stack
from qunet_bench.hybrid import insert_lesions, write_hybrids
from qunet.__main__ import main
from qunet.io import load_label, load_stack
from qunet_bench.synthetic import KINDS

SHAPE = (64, 64, 20)
SEEDS = (0, 1, 2, 3, 4)


@pytest.fixture(scope="module")
def stacks():
    return {(kind, seed): prevalence_stack(kind, seed, SHAPE) for kind in KINDS for seed in SEEDS}


@pytest.mark.parametrize("kind", KINDS)
def test_prevalence_and_several_distinct_3d_lesions(kind, stacks):
    areas = []
    for seed in SEEDS:
        s = stacks[kind, seed]
        present = s.label.any(axis=(0, 1))
        assert PREVALENCE[0] <= present.mean() <= PREVALENCE[1], (seed, present.mean())
        regions, count = ndimage.label(s.label)
        assert count >= 2, seed
        for r in range(1, count + 1):
            per_slice = (regions == r).sum(axis=(0, 1))
            run = np.flatnonzero(per_slice)
            assert run[-1] - run[0] + 1 == run.size  # consecutive slices
            areas.append(per_slice[run].max())
            if run.size >= 3:
                assert per_slice[run].min() < per_slice[run].max()  # size changes from slice to slice
    assert min(areas) <= 20 and max(areas) >= 3 * min(areas)  # from a few pixels across to larger


def test_prevalence_keeps_the_generators_degradations_and_contrast_varies(stacks):
    for (kind, seed), s in stacks.items():
        assert (s.blur_sigma > 0).any() and (s.contrast < 1).any() and (s.duplicate_of >= 0).any()
        assert np.isfinite(s.image).all()
    # CT opacities: HU added at the core range from faint (~80) to dense (~500) across stacks
    peaks = [np.percentile(s.image[s.label > 0], 90) for (kind, _), s in stacks.items() if kind == "ct"]
    assert max(peaks) - min(peaks) > 100


@pytest.mark.parametrize("kind", KINDS)
def test_prevalence_deterministic_in_seed(kind, stacks):
    again = prevalence_stack(kind, 0, SHAPE)
    assert np.array_equal(again.image, stacks[kind, 0].image) and np.array_equal(again.label, stacks[kind, 0].label)
    assert not np.array_equal(stacks[kind, 0].label, stacks[kind, 1].label)


def test_plan_spans_respects_taken_and_allowed_slices():
    taken = np.zeros(40, bool)
    taken[10:13] = True
    allowed = np.ones(40, bool)
    allowed[30:] = False
    for seed in range(20):
        spans = plan_spans(np.random.default_rng(seed), 40, 3, taken, allowed, min_new=2)
        assert len(spans) == 3
        covered = np.zeros(40, bool)
        for start, length in spans:
            assert length >= 1 and allowed[start : start + length].all()
            covered[start : start + length] = True
        assert (covered & ~taken).sum() >= 2 and (covered | taken).mean() <= PREVALENCE[1]


@pytest.fixture(scope="module")
def breast():
    image = sitk.ReadImage(str(SAMPLES / "breast1.nrrd"))
    own = sitk.GetArrayFromImage(sitk.ReadImage(str(TRUTH / "breast1.nrrd"))).T
    array = sitk.GetArrayFromImage(image).T  # (X, Y, Z) as qunet.io loads it
    return image, array, own, {seed: insert_lesions(array, own, image.GetSpacing(), seed) for seed in SEEDS}


def _ring(mask: np.ndarray, inner: int, outer: int) -> np.ndarray:
    """In-plane ring from `inner` to `outer` pixels around a mask, in its slices."""
    grow = lambda px: ndimage.binary_dilation(mask, np.ones((2 * px + 1, 2 * px + 1, 1), bool))  # noqa: E731
    return grow(outer) & ~grow(inner)


def test_hybrid_changes_only_the_inserted_lesions_and_keeps_the_own_lesion(breast):
    _, array, own, hybrids = breast
    for seed, h in hybrids.items():
        assert h.image.dtype == array.dtype and h.image.shape == array.shape
        assert h.lesions >= 1 and h.inserted.any()
        assert np.array_equal(h.image[~h.inserted], array[~h.inserted])
        assert np.array_equal(h.mask, ((own > 0) | h.inserted).astype(np.uint8))
        assert not (ndimage.binary_dilation(own > 0, iterations=2) & h.inserted).any()  # own lesion untouched
        assert ndimage.label(h.mask)[1] >= h.lesions + 1
    again = insert_lesions(array, own, breast[0].GetSpacing(), 0)
    assert np.array_equal(again.image, hybrids[0].image) and np.array_equal(again.mask, hybrids[0].mask)
    assert not np.array_equal(hybrids[0].inserted, hybrids[1].inserted)


def test_inserted_lesions_sit_in_tissue_like_the_own_lesions_surroundings(breast):
    _, array, own, hybrids = breast
    values = array.astype(np.float32)
    p1, p99 = np.percentile(values, (1, 99))
    surroundings = values[_ring(own > 0, 3, 6)]
    low, high = np.percentile(surroundings, (5, 95))
    for h in hybrids.values():
        assert values[h.inserted].min() > p1 + 0.1 * (p99 - p1)  # in the body, not the air
        regions, count = ndimage.label(h.inserted)
        for r in range(1, count + 1):
            assert low <= np.median(values[regions == r]) <= high


def test_inserted_lesion_contrast_is_visible_but_not_saturated(breast):
    _, array, own, hybrids = breast
    source = array.astype(np.float64)
    own_contrast = abs(source[own > 0].mean() - source[_ring(own > 0, 3, 6)].mean())
    for h in hybrids.values():
        image = h.image.astype(np.float64)
        regions, count = ndimage.label(h.inserted)
        for r in range(1, count + 1):
            lesion = regions == r
            core = ndimage.binary_erosion(lesion, np.ones((3, 3, 1), bool))  # without the soft edge
            ring = _ring(lesion, 1, 4) & (h.mask == 0)
            contrast = abs(image[core if core.any() else lesion].mean() - image[ring].mean())
            # stated range: 20-130 % of the contrast of the scan's own lesion against its surroundings
            assert 0.2 * own_contrast <= contrast <= 1.3 * own_contrast, (contrast, own_contrast)
            assert source.min() <= image[lesion].min() and image[lesion].max() <= source.max()


def test_written_hybrids_keep_geometry_and_dtype(tmp_path):
    source = tmp_path / "scans"
    (source / "ground-truth").mkdir(parents=True)
    shutil.copy(SAMPLES / "breast1.nrrd", source)
    shutil.copy(TRUTH / "breast1.nrrd", source / "ground-truth")
    shutil.copy(SAMPLES / "oct1.nii.gz", source)  # no mask: not a source
    written, summary = write_hybrids(source, tmp_path / "out", 2, seed=5)
    assert [p.name for p in written] == ["breast1-h1.nrrd", "breast1-h2.nrrd"] and len(summary) == 2
    original = load_stack(SAMPLES / "breast1.nrrd")
    for path in written:
        stack = load_stack(path)
        np.testing.assert_allclose(stack.affine, original.affine, atol=1e-6)
        mask = load_label(tmp_path / "out" / "ground-truth" / path.name, stack)
        assert mask[load_label(TRUTH / "breast1.nrrd", original) > 0].all()  # the real lesion still counts
        changed = stack.array != original.array
        assert changed.any() and mask[changed].all()
        assert sitk.ReadImage(str(path)).GetPixelID() == sitk.ReadImage(str(SAMPLES / "breast1.nrrd")).GetPixelID()
    assert not np.array_equal(load_stack(written[0]).array, load_stack(written[1]).array)


def run_generate(capsys, *args: str) -> tuple[int, dict | str]:
    """`python -m qunet generate ARGS` in this process (test_cli.py runs the real command once)."""
    code = main(["generate", *args])
    out = capsys.readouterr()
    return code, (json.loads(out.out) if code == 0 else out.err)


def test_generate_cli_writes_cohorts(tmp_path, capsys):
    code, out = run_generate(
        capsys,
        str(tmp_path / "p"),
        "--cohort",
        "prevalence",
        "--count",
        "2",
        "--seed",
        "1",
        "--shape",
        "40",
        "40",
        "20",
    )
    assert code == 0, out
    names = [p.split("/")[-1] for p in out["written"]]
    assert names == ["ct-p1.nii.gz", "ct-p2.nii.gz", "oct-p1.nii.gz", "oct-p2.nii.gz"]
    assert [s.split(":")[0] for s in out["summary"]] == names
    for path in out["written"]:
        stack = load_stack(path)
        mask = load_label(tmp_path / "p" / "ground-truth" / path.split("/")[-1], stack)
        assert PREVALENCE[0] <= mask.any(axis=(0, 1)).mean() <= PREVALENCE[1]
    code, out = run_generate(
        capsys,
        str(tmp_path / "h"),
        "--cohort",
        "hybrid",
        "--from",
        str(SAMPLES),
        "--stacks",
        "breast1",
        "--count",
        "3",
        "--seed",
        "1",
    )
    assert code == 0, out
    names = [f"breast1-h{i}.nrrd" for i in (1, 2, 3)]
    assert [p.split("/")[-1] for p in out["written"]] == names
    assert all(s.startswith(f"{n}: lesions in ") and s.endswith(" inserted") for n, s in zip(names, out["summary"]))
    assert sorted(p.name for p in (tmp_path / "h" / "ground-truth").iterdir()) == names
    for args in (
        ["--cohort", "hybrid"],
        ["--from", str(SAMPLES)],
        ["--cohort", "hybrid", "--from", str(SAMPLES), "--stacks", "nonesuch"],
    ):
        code, err = run_generate(capsys, str(tmp_path / "x"), *args)
        assert code == 2 and err.startswith("error: "), args


def test_hybrid_of_a_scan_without_a_lesion_and_a_mask_off_the_grid(breast, tmp_path):
    image, array, own, _ = breast
    h = insert_lesions(array, np.zeros_like(own), image.GetSpacing(), 3)
    assert h.lesions >= 1 and np.array_equal(h.mask, h.inserted.astype(np.uint8))
    assert np.array_equal(h.image[~h.inserted], array[~h.inserted])
    (tmp_path / "ground-truth").mkdir()
    shutil.copy(SAMPLES / "breast1.nrrd", tmp_path)
    shifted = sitk.ReadImage(str(TRUTH / "breast1.nrrd"))
    shifted.SetOrigin([o + 5 for o in shifted.GetOrigin()])
    sitk.WriteImage(shifted, str(tmp_path / "ground-truth" / "breast1.nrrd"))
    with pytest.raises(ValueError, match="not on the image's grid"):
        write_hybrids(tmp_path, tmp_path / "out", 1, 0)
