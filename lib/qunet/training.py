"""The training recipe, one loop for the app's trainer and every experiment.

nnU-Net's recipe for learning from little data, measured on this project's stacks (docs/learning-curve.md):
patches at native resolution with a fixed share centred on lesion (qunet.slices.PatchSampler), spatial and
intensity augmentation, Dice + cross-entropy over the whole batch on all four U-net++ heads (a batch of empty
patches still has a gradient), AdamW with a poly learning-rate decay, and a fixed number of updates.
"""

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
)

from qunet.config import TrainConfig
from qunet.network import DeepSupervisionDiceCE, channels_last
from qunet.slices import PatchSampler, TrainingSlice


def augmentation() -> Compose:
    """Spatial (rotation +-15 degrees, scale +-30 %, flips) and intensity (noise, scale, gamma) augmentation of a
    patch; nearest-neighbour for the target so lesion borders stay binary. The wide scale range is what lets a
    nodule annotated on one slice be found on its neighbours, where it is smaller (docs/learning.md)."""
    keys = ("image", "label")
    return Compose([
        RandAffined(keys, prob=0.5, rotate_range=math.radians(15), scale_range=(0.3, 0.3),
                    mode=("bilinear", "nearest"), padding_mode="border"),
        RandFlipd(keys, prob=0.5, spatial_axis=0),
        RandFlipd(keys, prob=0.5, spatial_axis=1),
        RandGaussianNoised("image", prob=0.15, std=0.1),
        RandScaleIntensityd("image", prob=0.15, factors=0.25),
        RandAdjustContrastd("image", prob=0.15, gamma=(0.7, 1.5)),
    ])


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch generators: a network built right after this starts from the same weights."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class EpochStats:
    epoch: int  # 1-based
    epochs: int
    loss: float  # mean over the epoch's updates
    dice: float  # level-4 Dice over the epoch's training patches (thresholded), pooled
    seconds: float  # since training started


def _batch(sampler: PatchSampler, size: int, transform: Compose | None) -> tuple[torch.Tensor, torch.Tensor]:
    patches = [sampler.patch() for _ in range(size)]
    if transform is not None:
        patches = [transform(p) for p in patches]
    # plain tensors: MONAI's MetaTensor would track metadata through every layer, forward and backward (10x slower)
    return (torch.stack([p["image"] for p in patches]).as_subclass(torch.Tensor),
            torch.stack([p["label"] for p in patches]).as_subclass(torch.Tensor))


def train(
    network: torch.nn.Module,
    slices: list[TrainingSlice],
    config: TrainConfig,
    patch_size: int,
    *,
    seed: int = 0,
    device: torch.device | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> list[EpochStats]:
    """Train `network` in place on annotated slices for config.max_epochs x config.steps_per_epoch updates.

    Deterministic in `seed` on a given machine. Returns each epoch's statistics (also passed to `on_epoch`);
    `should_stop()` is asked after every update (a client's stop request)."""
    device = device or next(network.parameters()).device
    channels_last(network, device).train()
    sampler = PatchSampler(slices, patch_size, config.foreground, seed)
    transform = augmentation() if config.augment else None
    if transform is not None:
        transform.set_random_state(seed=seed % 2**32)
    steps = config.max_epochs * config.steps_per_epoch
    optimiser = torch.optim.AdamW(network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.PolynomialLR(optimiser, total_iters=steps, power=0.9)
    loss_fn = DeepSupervisionDiceCE()
    start, history, stopped = time.perf_counter(), [], False
    for epoch in range(config.max_epochs):
        total, overlap, size, done = 0.0, 0.0, 0.0, 0
        for _ in range(config.steps_per_epoch):
            x, y = _batch(sampler, config.batch_size, transform)
            x, y = x.to(device=device, memory_format=torch.channels_last), y.to(device)
            optimiser.zero_grad(set_to_none=True)
            heads = network(x)
            loss = loss_fn(heads, y)
            loss.backward()
            optimiser.step()
            schedule.step()
            total, done = total + loss.item(), done + 1
            with torch.no_grad():
                found = heads[-1] > 0 if isinstance(heads, (list, tuple)) else heads > 0
                overlap += 2 * float((found & (y > 0)).sum())
                size += float(found.sum() + (y > 0).sum())
            stopped = should_stop()
            if stopped:
                break
        stats = EpochStats(epoch + 1, config.max_epochs, total / done,
                           overlap / size if size else 1.0, round(time.perf_counter() - start, 2))
        history.append(stats)
        if on_epoch is not None:
            on_epoch(stats)
        if stopped:  # the epoch in progress was reported
            break
    network.eval()
    return history
