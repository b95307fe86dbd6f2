import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from qunet_bench.synthetic import KINDS, SPAN, SyntheticStack, generate_stack, write_dataset

SEEDS = (0, 1, 2, 3)
SHAPE = (128, 128, 32)


@pytest.fixture(scope="module")
def stacks() -> dict[tuple[str, int], SyntheticStack]:
    return {(kind, seed): generate_stack(kind, seed) for kind in KINDS for seed in SEEDS}


def _clean_slices(s: SyntheticStack) -> np.ndarray:
    return (s.blur_sigma == 0) & (s.contrast == 1) & (s.duplicate_of < 0)


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_in_seed(kind, stacks):
    again = generate_stack(kind, 0)
    for field in ("image", "label", "blur_sigma", "noise_std", "contrast", "duplicate_of"):
        assert np.array_equal(getattr(again, field), getattr(stacks[kind, 0], field)), field
    assert not np.array_equal(stacks[kind, 0].image, stacks[kind, 1].image)
    assert not np.array_equal(stacks[kind, 0].label, stacks[kind, 1].label)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", SEEDS)
def test_shapes_dtypes_and_lesion_fraction(kind, seed, stacks):
    s = stacks[kind, seed]
    assert s.image.shape == s.label.shape == SHAPE
    assert s.image.dtype == np.float32 and s.label.dtype == np.uint8
    assert set(np.unique(s.label)) == {0, 1}
    for per_slice in (s.blur_sigma, s.noise_std, s.contrast, s.duplicate_of):
        assert per_slice.shape == (SHAPE[2],)
    present = s.label.any(axis=(0, 1))
    assert 0.3 <= present.mean() <= 0.6
    slab = np.flatnonzero(present)
    assert slab[-1] - slab[0] + 1 == slab.size  # one contiguous run of lesion slices


def test_small_shape_works_and_invalid_input_raises():
    assert generate_stack("ct", 0, (32, 32, 4)).image.shape == (32, 32, 4)
    with pytest.raises(ValueError, match="oct, ct"):
        generate_stack("mri", 0)
    with pytest.raises(ValueError):
        generate_stack("oct", 0, (16, 128, 32))
    with pytest.raises(ValueError):
        generate_stack("oct", 0, (128, 128, 3))


@pytest.mark.parametrize("kind", KINDS)
def test_degradation_records(kind, stacks):
    for seed in SEEDS:
        s = stacks[kind, seed]
        blurred = s.blur_sigma > 0
        assert 0.15 <= blurred.mean() <= 0.4  # 20-30%, plus copies of blurred slices
        assert np.all((s.blur_sigma[blurred] >= 1.5) & (s.blur_sigma[blurred] <= 4))
        flat = s.contrast < 1
        assert flat.any() and np.all((s.contrast[flat] >= 0.3) & (s.contrast[flat] <= 0.6))
        assert np.all(s.noise_std > 0) and s.noise_std.max() > 2 * s.noise_std.min()
        assert 2 <= (s.duplicate_of >= 0).sum() <= 3


@pytest.mark.parametrize("kind", KINDS)
def test_contrast_reduced_slices_have_less_spread(kind, stacks):
    for seed in SEEDS:
        s = stacks[kind, seed]
        spread = s.image.std(axis=(0, 1))
        flat = s.contrast < 1
        assert spread[flat].max() < 0.8 * np.median(spread[_clean_slices(s)]), seed


def test_ct_noise_matches_record(stacks):
    for seed in SEEDS:
        s = stacks["ct", seed]
        air = s.image[:, :10]  # anterior strip outside the body: flat -1000 HU plus the added noise
        assert np.allclose(air.std(axis=(0, 1)), s.noise_std * SPAN["ct"], rtol=0.1)


def _laplacian_variance(sl: np.ndarray) -> float:
    sl = (sl - sl.min()) / (sl.max() - sl.min())
    return float(ndimage.laplace(sl.astype(np.float64)).var())


@pytest.mark.parametrize("kind", KINDS)
def test_blurred_slices_are_less_sharp(kind, stacks):
    for seed in SEEDS:
        s = stacks[kind, seed]
        lv = np.array([_laplacian_variance(s.image[:, :, k]) for k in range(SHAPE[2])])
        blurred = s.blur_sigma > 0
        assert lv[blurred].max() < lv[~blurred].mean(), seed


@pytest.mark.parametrize("kind", KINDS)
def test_duplicates_match_their_source(kind, stacks):
    for seed in SEEDS:
        s = stacks[kind, seed]
        for k in np.flatnonzero(s.duplicate_of >= 0):
            src = s.duplicate_of[k]
            assert src < k and s.duplicate_of[src] == -1
            corr = np.corrcoef(s.image[:, :, k].ravel(), s.image[:, :, src].ravel())[0, 1]
            assert corr > 0.95
            assert not np.array_equal(s.image[:, :, k], s.image[:, :, src])  # near, not exact
            assert np.array_equal(s.label[:, :, k], s.label[:, :, src])


def test_oct_cysts_are_darker_than_surrounding_retina(stacks):
    for seed in SEEDS:
        s = stacks["oct", seed]
        clean = _clean_slices(s)
        cyst = s.label.astype(bool) & clean
        ring = ndimage.binary_dilation(s.label, np.ones((7, 7, 1))) & ~s.label.astype(bool) & clean
        assert cyst.any()
        assert s.image[cyst].mean() < 0.5 * s.image[ring].mean()


def test_ct_opacities_lie_in_lungs(stacks):
    for seed in SEEDS:
        s = stacks["ct", seed]
        clean = _clean_slices(s)
        img = s.image[:, :, clean]
        lesion = s.label[:, :, clean].astype(bool)
        lung = (img < -700) & ~lesion  # aerated lung, not air outside the body (about -1000)
        lung &= img > -950
        soft = img > -200
        assert lesion.any()
        assert soft[lesion].mean() < 0.15  # only vessels crossing the opacity
        assert img[lung].mean() + 100 < img[lesion].mean() < img[soft].mean() - 300
        fields = np.stack([_lung_fields(img[:, :, k]) for k in range(img.shape[2])], axis=2)
        assert fields[lesion].mean() > 0.9  # opacities touching the heart or pleura blend in


def _lung_fields(sl: np.ndarray) -> np.ndarray:
    """Dark regions enclosed by the body; closing and hole filling take in vessels and opacities."""
    regions, _ = ndimage.label(sl < -400)
    border = np.unique(np.concatenate([regions[0], regions[-1], regions[:, 0], regions[:, -1]]))
    inner = (regions > 0) & ~np.isin(regions, border)
    return ndimage.binary_fill_holes(ndimage.binary_closing(inner, np.ones((5, 5)), border_value=0))


def test_ct_values_are_hu_like(stacks):
    s = stacks["ct", 0]
    assert -1200 < s.image.min() < -900
    assert 0 < np.median(s.image[s.image > -300]) < 100


def test_write_dataset(tmp_path):
    paths = write_dataset(tmp_path / "data", count=2, seed=3)
    names = ["ct1.nii.gz", "ct2.nii.gz", "oct1.nii.gz", "oct2.nii.gz"]
    assert [p.name for p in paths] == names
    for p in paths:
        gt = p.parent / "ground-truth" / p.name
        assert p.exists() and gt.exists()
        assert p.stat().st_size < 1.5e6 and gt.stat().st_size < 1.5e6
        img, lab = nib.load(p), nib.load(gt)
        assert img.shape == lab.shape == SHAPE
        assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(lab.dataobj))) == {0, 1}
        zooms = img.header.get_zooms()
        assert zooms == pytest.approx((0.7, 0.7, 5.0) if p.name.startswith("ct") else (0.012, 0.004, 0.12))
    oct_data = np.asarray(nib.load(paths[2]).dataobj)
    assert oct_data.min() >= 0 and oct_data.max() <= 1000 and oct_data.max() > 500
    assert not np.array_equal(oct_data, np.asarray(nib.load(paths[3]).dataobj))
    again = write_dataset(tmp_path / "again", count=2, seed=3)
    assert [a.read_bytes() for a in again] == [p.read_bytes() for p in paths]


def test_write_dataset_subset_and_invalid_kind(tmp_path):
    assert [p.name for p in write_dataset(tmp_path, kinds=("oct",), count=1, shape=(32, 32, 4))] == ["oct1.nii.gz"]
    with pytest.raises(ValueError, match="allowed kinds"):
        write_dataset(tmp_path / "bad", kinds=("oct", "xray"))
    assert not (tmp_path / "bad").exists()  # validated before anything is written
