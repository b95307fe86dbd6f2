"""The training recipe, one loop for the app's trainer and every experiment.

nnU-Net's recipe for learning from little data, measured on this project's stacks (docs/method.md):
patches at native resolution with a fixed share holding lesion (qunet.slices.PatchSampler), spatial and
intensity augmentation, Dice + cross-entropy over the whole batch on all four U-net++ heads (a batch of empty
patches still has a gradient), AdamW with a poly learning-rate decay, and a fixed number of updates.

Over torch.distributed ranks (torchrun, or the app's `multi_gpu`) the same training runs with
DistributedDataParallel: every rank draws the same whole batch (same seed) and runs the network on its share;
the outputs are gathered so that each rank computes the loss over the whole batch (the batch Dice does not split
into per-rank means), with a gradient only through its own share; DDP's averaged gradients times the number of
ranks are then the one-process gradient. Same result as one process, up to floating-point rounding.
"""

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
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
from qunet.threads import share_cores


def augmentation() -> Compose:
    """Spatial (rotation +-15 degrees, scale +-30 %, flips) and intensity (noise, scale, gamma) augmentation of a
    patch; nearest-neighbour for the target so lesion borders stay binary. The wide scale range is what lets a
    nodule annotated on one slice be found on its neighbours, where it is smaller (docs/method.md)."""
    keys = ("image", "label")
    return Compose(
        [
            RandAffined(
                keys,
                prob=0.5,
                rotate_range=math.radians(15),
                scale_range=(0.3, 0.3),
                mode=("bilinear", "nearest"),
                padding_mode="border",
            ),
            RandFlipd(keys, prob=0.5, spatial_axis=0),
            RandFlipd(keys, prob=0.5, spatial_axis=1),
            RandGaussianNoised("image", prob=0.15, std=0.1),
            RandScaleIntensityd("image", prob=0.15, factors=0.25),
            RandAdjustContrastd("image", prob=0.15, gamma=(0.7, 1.5)),
        ]
    )


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
    return (
        torch.stack([p["image"] for p in patches]).as_subclass(torch.Tensor),
        torch.stack([p["label"] for p in patches]).as_subclass(torch.Tensor),
    )


def _ranks() -> tuple[int, int]:
    """(this rank, ranks) of the initialised torch.distributed group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _whole_batch(heads: list[torch.Tensor] | torch.Tensor, rank: int, ranks: int) -> list[torch.Tensor] | torch.Tensor:
    """Every rank's outputs, concatenated in rank order (the batch's order); differentiable in this rank's share."""
    whole = []
    for head in [heads] if isinstance(heads, torch.Tensor) else heads:
        parts = [torch.empty(head.shape, dtype=head.dtype, device=head.device) for _ in range(ranks)]
        dist.all_gather(parts, head.detach().contiguous())
        parts[rank] = head
        whole.append(torch.cat(parts))
    return whole[0] if isinstance(heads, torch.Tensor) else whole


def _any_rank(flag: bool, device: torch.device) -> bool:
    """A stop asked for on any rank stops all of them at the same update."""
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


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
    `should_stop()` is asked after every update (a client's stop request). Inside a torch.distributed group, every
    rank calls it alike (same slices, config and seed) and trains its share of each batch (see the module)."""
    device = device or next(network.parameters()).device
    rank, ranks = _ranks()
    if config.batch_size % ranks:
        raise ValueError(f"batch size {config.batch_size} does not split over {ranks} ranks")
    share = config.batch_size // ranks
    channels_last(network, device).train()
    model = network
    if ranks > 1:  # also makes every rank start from rank 0's weights
        model = DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None)
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
            share_cores()  # as many threads as cores other processes leave free (qunet.threads)
            x, y = _batch(sampler, config.batch_size, transform)  # the whole batch, alike on every rank
            x, y = (
                x[rank * share : (rank + 1) * share].to(device=device, memory_format=torch.channels_last),
                y.to(device),
            )
            optimiser.zero_grad(set_to_none=True)
            heads = model(x)
            if ranks > 1:
                heads = _whole_batch(heads, rank, ranks)
            loss = loss_fn(heads, y)
            (loss * ranks).backward()  # DDP averages the ranks' gradients: times ranks, their sum
            optimiser.step()
            schedule.step()
            total, done = total + loss.item(), done + 1
            with torch.no_grad():
                found = heads[-1] > 0 if isinstance(heads, (list, tuple)) else heads > 0
                overlap += 2 * float((found & (y > 0)).sum())
                size += float(found.sum() + (y > 0).sum())
            stopped = should_stop() if ranks == 1 else _any_rank(should_stop(), device)
            if stopped:
                break
        stats = EpochStats(
            epoch + 1,
            config.max_epochs,
            total / done,
            overlap / size if size else 1.0,
            round(time.perf_counter() - start, 2),
        )
        history.append(stats)
        if on_epoch is not None:
            on_epoch(stats)
        if stopped:  # the epoch in progress was reported
            break
    network.eval()
    return history
