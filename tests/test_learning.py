"""The training recipe: intensities, foreground-oversampled patches, determinism, and a model that learns."""

import numpy as np
import pytest
import torch

from qunet.config import TrainConfig
from qunet.disagreement import segment
from qunet.network import build_network, prepare
from qunet.slices import CHUNK, Intensity, PatchSampler, TrainingSlice, training_slices
from qunet_bench.synthetic import generate_stack
from qunet.training import seed_everything, train

TINY = (4, 4, 8, 8, 16, 4)


def test_intensity_is_z_scored_after_clipping_and_ignores_affine_rescaling():
    rng = np.random.default_rng(0)
    ct = rng.normal(40, 30, (40, 40, 2 * CHUNK + 3)).astype(np.float32)  # more slices than a chunk
    ct[0, 0, 0] = 3071  # one metal voxel does not stretch the range
    unit = Intensity.of(ct).apply(ct)
    assert abs(unit.mean()) < 1e-3 and abs(unit.std() - 1) < 1e-3
    assert unit.max() < 4  # clipped at the 99.5th percentile
    mr = ct * 7.5 + 1000  # the same anatomy on another scanner's scale
    assert np.allclose(Intensity.of(mr).apply(mr), unit, atol=1e-3)
    constant = Intensity.of(np.full((8, 8, 3), 5.0, np.float32))
    assert np.all(constant.apply(np.full((8, 8, 3), 5.0, np.float32)) == 0)  # no division by zero


def _slices(n: int, lesion_in: set[int], size=(40, 50)) -> list[TrainingSlice]:
    out = []
    for k in range(n):
        target = np.zeros((1, *size), np.float32)
        if k in lesion_in:
            target[0, size[0] - 7 : size[0] - 4, 5:8] = 1  # a 3x3 lesion near the border
        out.append(TrainingSlice(np.random.default_rng(k).normal(size=(1, *size)).astype(np.float32), target, -2.0))
    return out


def test_patches_hold_lesion_in_the_foreground_share_across_the_batch():
    """One lesion slice among ten, a lesion of 9 pixels: half the patches still hold it (per-slice sampling:
    about 5 %)."""
    sampler = PatchSampler(_slices(10, {4}), 16, foreground=0.5, seed=0)
    patches = [sampler.patch() for _ in range(400)]
    assert all(p["image"].shape == (1, 16, 16) and p["label"].shape == (1, 16, 16) for p in patches)
    with_lesion = np.mean([float(p["label"].sum() > 0) for p in patches])
    assert 0.42 < with_lesion < 0.62, with_lesion
    none = PatchSampler(_slices(10, {4}), 16, foreground=0.0, seed=0)
    assert np.mean([float(none.patch()["label"].sum() > 0) for _ in range(400)]) < 0.2


def test_lesion_patches_are_shared_out_between_stacks():
    """A tumour annotated on six slices of one stack and a nodule on one slice of another get as many patches."""
    tumour = [TrainingSlice(s.image, s.target, s.background, "mri", k) for k, s in enumerate(_slices(8, set(range(6))))]
    nodule = [TrainingSlice(s.image, s.target * 2, s.background, "ct", k) for k, s in enumerate(_slices(8, {3}))]
    sampler = PatchSampler(tumour + nodule, 16, foreground=1.0, seed=0)
    hits = [sampler.patch()["label"].max().item() for _ in range(300)]
    assert 0.4 < np.mean([h == 2 for h in hits]) < 0.6  # the nodule's label value is 2 here


def test_slices_smaller_than_a_patch_are_padded_with_background():
    sampler = PatchSampler(_slices(2, {0}, size=(10, 12)), 16, foreground=1.0, seed=1)
    p = sampler.patch()
    assert p["image"].shape == (1, 16, 16)
    assert (p["image"] == -2.0).sum() == 16 * 16 - 10 * 12 and p["label"].sum() == 9


def test_training_is_deterministic_by_seed():
    slices = _slices(4, {1, 2})
    weights = []
    for _ in range(2):
        seed_everything(3)
        net = build_network(TINY)
        history = train(net, slices, TrainConfig(max_epochs=2, steps_per_epoch=2, batch_size=2), 16, seed=3)
        weights.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
    assert [h.epoch for h in history] == [1, 2] and all(h.loss > 0 for h in history)
    assert torch.equal(weights[0], weights[1])


def test_a_model_trained_on_a_few_slices_finds_the_lesion_on_a_held_out_slice():
    """Six annotated slices of a small generated OCT-like stack (two with cysts) at native resolution: the model
    finds the cysts on lesion slices it never saw, with the app's recipe at a reduced size."""
    stack = generate_stack("oct", seed=5, shape=(96, 96, 16))
    lesion = [int(k) for k in np.flatnonzero(stack.label.any(axis=(0, 1)))]
    assert len(lesion) >= 4
    other = [k for k in range(16) if k not in lesion]
    annotated = sorted(lesion[::2][:2] + other[:4])
    held_out = [k for k in lesion if k not in annotated]
    seed_everything(0)
    net = build_network((8, 16, 32, 64, 128, 8))
    settings = TrainConfig(max_epochs=6, steps_per_epoch=25, batch_size=8)
    history = train(net, training_slices(stack.image, stack.label, annotated, 1), settings, 48, seed=0)
    assert history[-1].loss < history[0].loss
    found = segment(prepare(net, torch.device("cpu")), stack.image.astype(np.float32), 48, held_out) > 0
    truth = stack.label[:, :, held_out] > 0
    dice = 2 * (found & truth).sum() / (found.sum() + truth.sum())
    assert dice > 0.5, dice


@pytest.mark.parametrize("stop_after", [3])
def test_training_stops_when_asked(stop_after):
    calls = []
    history = train(
        build_network(TINY),
        _slices(3, {0}),
        TrainConfig(max_epochs=5, steps_per_epoch=2, batch_size=2),
        16,
        should_stop=lambda: calls.append(1) or len(calls) >= stop_after,
    )
    assert len(history) == 2 and len(calls) == stop_after  # the epoch in progress is reported, then training ends
