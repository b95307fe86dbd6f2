"""The paper's training recipe: augmentation shared by the app's trainer, and a plain PyTorch loop for experiments.

The app trains through MONAI Label's BasicTrainTask with `augmentation()`; the experiments (qunet.experiment)
train with `train()` below, which applies the same augmentation, loss and optimiser without a server.
"""

import math
import random
from collections.abc import Callable

import numpy as np
import torch
from monai.losses import DiceLoss
from monai.transforms import Compose, EnsureTyped, RandAffined

from qunet.network import deep_supervision_loss


def augmentation(image_size: int, augment_range: float = 0.2) -> list:
    """Random rotation (rad), shift (fraction of the size) and shear, each within +-augment_range, no flips.

    The paper trains with Keras' rotation/width/height/shear ranges of 0.2 and vertical flips disabled;
    borders are filled with the nearest pixel as Keras' default does."""
    r = augment_range
    return [
        EnsureTyped(keys=("image", "label"), track_meta=False),
        RandAffined(
            keys=("image", "label"),
            prob=1.0,
            rotate_range=r,
            translate_range=(r * image_size, r * image_size),
            shear_range=(r, r),
            mode=("bilinear", "nearest"),
            padding_mode="border",
        ),
    ]


def augment(image_size: int, augment_range: float = 0.2) -> Compose:
    return Compose(augmentation(image_size, augment_range))


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch generators: a network built right after this starts from the same weights."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def loss_for(network: torch.nn.Module) -> Callable:
    """Dice on all four heads for the U-net++ (a list of outputs), plain Dice for a one-output network."""
    dice = DiceLoss(sigmoid=True, batch=True)
    deep = deep_supervision_loss()

    def loss(output, target: torch.Tensor) -> torch.Tensor:
        return deep(output, target) if isinstance(output, (list, tuple)) else dice(output, target)

    return loss


def train(
    network: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    batch_size: int = 20,
    learning_rate: float = 1e-4,
    augment_range: float = 0.2,
    steps_per_epoch: int | None = None,
    seed: int = 0,
    device: torch.device | None = None,
    on_step: Callable[[float], None] | None = None,
) -> list[float]:
    """Adam on (N, 1, S, S) images and (N, C, S, S) binary targets; returns the mean loss of each epoch.

    Each epoch draws `steps_per_epoch` batches (default: one pass, ceil(N / batch_size)) from a reshuffled
    cycle over the N slices, each slice augmented afresh. With `steps_per_epoch` fixed, models trained on
    different numbers of slices get the same number of updates. Deterministic in `seed` on a given machine.
    The network is trained in place (channels-last on its device) and returned in train() mode.
    """
    if len(images) == 0 or len(images) != len(labels):
        raise ValueError(f"need matching, non-empty images and labels, got {len(images)} and {len(labels)}")
    device = device or next(network.parameters()).device
    network.to(device=device, memory_format=torch.channels_last).train()
    rng = np.random.default_rng(seed)
    transform = augment(images.shape[-1], augment_range) if augment_range > 0 else None
    if transform is not None:
        transform.set_random_state(seed=seed % 2**32)
    optimiser = torch.optim.Adam(network.parameters(), lr=learning_rate)
    loss_fn = loss_for(network)
    n = len(images)
    batch = min(batch_size, n)
    steps = steps_per_epoch or math.ceil(n / batch)
    order: list[int] = []
    history = []
    for _ in range(epochs):
        total = 0.0
        for _ in range(steps):
            while len(order) < batch:
                order += rng.permutation(n).tolist()
            idx, order = order[:batch], order[batch:]
            if transform is not None:
                pairs = [transform({"image": images[i], "label": labels[i]}) for i in idx]
                x = torch.stack([torch.as_tensor(p["image"]) for p in pairs])
                y = torch.stack([torch.as_tensor(p["label"]) for p in pairs])
            else:
                x, y = images[idx], labels[idx]
            x = x.to(device=device, memory_format=torch.channels_last)
            y = y.to(device=device)
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(network(x), y)
            loss.backward()
            optimiser.step()
            value = loss.detach().item()
            total += value
            if on_step is not None:
                on_step(value)
        history.append(total / steps)
    return history
