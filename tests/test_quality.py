import json

import numpy as np
import pytest
from scipy import ndimage

from qunet.config import QualityConfig
from qunet.quality import BLUR_FLOOR, SliceQuality, slice_quality
from qunet.selection import select_by_disagreement, select_initial


def textured_stack(depth: int = 6, size: int = 96, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = ndimage.gaussian_filter(rng.normal(size=(size, size)), 2) * 100 + 500
    return np.repeat(base[:, :, None], depth, axis=2).astype(np.float32)


def test_more_blur_gives_higher_blurriness():
    vol = textured_stack(4)
    for k, sigma in enumerate((0, 1, 2, 4)):
        if sigma:
            vol[:, :, k] = ndimage.gaussian_filter(vol[:, :, k], sigma)
    blur = slice_quality(vol).blurriness
    assert np.all(np.diff(blur) > 0), blur


def test_more_noise_gives_higher_psnr_inv():
    vol = textured_stack(4)
    rng = np.random.default_rng(1)
    for k, std in enumerate((0, 5, 20, 60)):
        vol[:, :, k] += rng.normal(scale=std, size=vol.shape[:2]) if std else 0
    psnr = slice_quality(vol).psnr_inv
    assert np.all(np.diff(psnr) > 0), psnr


def test_dim_slice_has_higher_psnr_inv_than_bright_copy():
    vol = textured_stack(2)
    vol[:, :, 1] = vol[:, :, 1] * 0.5  # same structure, half the maximum in the stack's scale
    vol[:, :, 0] += np.random.default_rng(2).normal(scale=5, size=vol.shape[:2])
    vol[:, :, 1] += np.random.default_rng(2).normal(scale=5, size=vol.shape[:2])
    psnr = slice_quality(vol).psnr_inv
    assert psnr[1] > psnr[0]


def test_constant_and_empty_slices_are_finite_and_invalid():
    vol = textured_stack(3)
    vol[:, :, 1] = 7.0
    vol[:, :, 2] = 0.0
    q = slice_quality(vol)
    for values in (q.blurriness, q.psnr_inv, q.cov, q.mean):
        assert np.isfinite(values).all()
    assert q.valid.tolist() == [True, False, False]
    assert q.blurriness[1] == pytest.approx(1 / BLUR_FLOOR)
    assert q.psnr_inv[1] == 0


def test_all_constant_stack():
    q = slice_quality(np.ones((16, 16, 3), np.float32))
    assert not q.valid.any() and np.isfinite(q.blurriness).all()
    assert select_initial(q) == []


def test_roi_mask_restricts_statistics():
    vol = textured_stack(2)
    mask = np.zeros(vol.shape, np.uint8)
    mask[10:20, 10:20, :] = 1
    vol[10:20, 10:20, 0] = vol.max()  # slice 0's ROI is uniform and at the top of the range
    q = slice_quality(vol, mask)
    assert q.roi == "mask"
    assert q.cov[0] == pytest.approx(0, abs=1e-6)
    assert q.mean[0] == pytest.approx(1, abs=1e-3)
    assert q.cov[1] > 0.01


def test_roi_mask_shape_must_match():
    with pytest.raises(ValueError, match="ROI mask shape"):
        slice_quality(textured_stack(2), np.zeros((3, 3, 2)))


def test_quality_record_is_plain_json():
    q = slice_quality(textured_stack(2))
    again = json.loads(json.dumps(q.to_dict()))  # what the app stores in image info
    assert (
        np.array_equal(again["blurriness"], q.blurriness)
        and again["valid"] == q.valid.tolist()
        and again["roi"] == q.roi
    )


def quality(blur, psnr, cov, mean, valid=None) -> SliceQuality:
    n = len(blur)
    return SliceQuality(
        *(np.asarray(v, float) for v in (blur, psnr, cov, mean)),
        np.ones(n, bool) if valid is None else np.asarray(valid),
        "auto",
    )


def test_s0_keeps_only_sharp_high_contrast_slices_ranked():
    q = quality(
        blur=[1, 5, 2, 9, 1.5], psnr=[1, 1, 2, 9, 1.2], cov=[0, 0.25, 0.5, 0.75, 1], mean=[0, 0.25, 0.5, 0.75, 1]
    )
    assert select_initial(q, QualityConfig(epsilon0=0.01, min_initial=0)) == [0, 4, 2]
    assert select_initial(q, QualityConfig(epsilon0=0.01, min_initial=3)) == [0, 4, 2]  # enough passed the cut-offs


def test_s0_never_keeps_near_duplicates_or_too_many():
    rng = np.random.default_rng(3)
    n = 200
    q = quality(rng.random(n), rng.random(n), rng.random(n), rng.random(n))
    for eps, cap in ((0.05, 10), (0.2, 50), (0.0, 3)):
        chosen = select_initial(q, QualityConfig(epsilon0=eps, max_initial=cap, min_initial=cap))
        assert 0 < len(chosen) <= cap
        feats = np.stack([q.cov, q.mean], 1)  # already in [0, 1]-ish; normalise as the code does
        feats = (feats - feats.min(0)) / (feats.max(0) - feats.min(0))
        for i, a in enumerate(chosen):
            for b in chosen[i + 1 :]:
                assert np.linalg.norm(feats[a] - feats[b]) > eps


def test_s0_drops_exact_duplicate_and_invalid_slices():
    q = quality(blur=[1, 1, 1], psnr=[1, 1, 1], cov=[0.5, 0.5, 0.1], mean=[0.5, 0.5, 0.9], valid=[True, True, False])
    assert select_initial(q) == [0]  # the duplicate is not added to reach min_initial


def test_s0_percentile_cutoffs():
    q = quality(blur=[1, 2, 3, 4], psnr=[1, 2, 3, 4], cov=[0, 0.3, 0.6, 1], mean=[0, 0.3, 0.6, 1])
    assert select_initial(q, QualityConfig(blur_percentile=30, psnr_percentile=30, min_initial=0)) == [0]
    assert len(select_initial(q, QualityConfig(blur_percentile=100, psnr_percentile=100))) == 4


def test_s0_filled_up_to_min_initial_in_rank_order():
    """Noisy stacks: sharp-looking slices are the low-contrast ones, so few pass both cut-offs."""
    q = quality(blur=[1, 2, 3, 4, 5, 6], psnr=[6, 5, 4, 3, 2, 1], cov=[0, 0.2, 0.4, 0.6, 0.8, 1], mean=[0] * 6)
    assert select_initial(q, QualityConfig(min_initial=0)) == []  # anti-correlated: no slice is below both means
    assert select_initial(q, QualityConfig(min_initial=3)) == [
        0,
        1,
        2,
    ]  # all tie on rank sum: by index, up to min_initial
    blurred = quality(blur=[1, 9, 9, 9], psnr=[1, 1, 2, 3], cov=[0, 0.3, 0.6, 1], mean=[0] * 4)
    assert select_initial(blurred, QualityConfig(min_initial=0)) == [0]
    assert select_initial(blurred, QualityConfig(min_initial=3)) == [0, 1, 2]  # next by rank sum: lowest PSNR-inv first
    assert select_initial(blurred, QualityConfig(min_initial=9, max_initial=2)) == [0, 1]  # never above max_initial


def test_disagreement_pick_lowest_first_excluding():
    q = np.array([0.9, 0.1, 0.4, np.nan, 0.3, 0.5])
    assert select_by_disagreement(q, 0.5) == [1, 4, 2]
    assert select_by_disagreement(q, 0.5, exclude=[4]) == [1, 2]
    assert select_by_disagreement(q, 0.5, limit=1) == [1]
