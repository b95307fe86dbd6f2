"""The 2D U-net++ with deep supervision (MONAI's BasicUNetPlusPlus), its loss, and loading and preparing it."""

import contextlib
import io
from collections.abc import Sequence

import torch
from monai.losses import DeepSupervisionLoss, DiceCELoss
from monai.networks.nets import BasicUNetPlusPlus

from qunet.config import DEFAULT_FEATURES


def build_network(
    features: Sequence[int] = DEFAULT_FEATURES, out_channels: int = 1, dropout: float = 0.0
) -> BasicUNetPlusPlus:
    """U-net++ returning four full-resolution heads (levels 1..4, shallowest first), one channel per label."""
    if len(features) != 6:
        raise ValueError(f"features needs six integers (five encoder levels and the last decoder), got {features}")
    with contextlib.redirect_stdout(io.StringIO()):  # BasicUNetPlusPlus prints its features
        return BasicUNetPlusPlus(
            spatial_dims=2,
            in_channels=1,
            out_channels=out_channels,
            features=tuple(int(f) for f in features),
            deep_supervision=True,
            dropout=dropout,
        )


class DeepSupervisionDiceCE(DeepSupervisionLoss):
    """Dice + cross-entropy over the whole batch on all four heads, equally weighted (as the paper's code weights
    its heads); takes the network's own order, shallowest head first, or one tensor (a one-output network).
    Over the batch, a batch of lesion-free patches still has a gradient (per-sample Dice of an empty target has
    none)."""

    def __init__(self) -> None:
        super().__init__(DiceCELoss(sigmoid=True, batch=True), weight_mode="same")

    def forward(self, input: list[torch.Tensor] | torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # noqa: A002
        heads = list(reversed(input)) if isinstance(input, (list, tuple)) else input  # main output first
        return super().forward(heads, target)


class ChannelsLastInstanceNorm(torch.nn.Module):
    """InstanceNorm2d (no running statistics) computed in the input's memory format.

    torch's instance_norm reshapes its input into one batch_norm call, which copies a channels-last tensor to
    contiguous and returns a contiguous one, so every following convolution converts it back: on CPU these copies
    cost more than the convolutions. Here the statistics come from one var_mean and the output from one fused
    multiply-add in channels-last. Same parameters (and state-dict keys) as the module it replaces, differentiable;
    outputs agree to float32 rounding (about 1e-6)."""

    def __init__(self, norm: torch.nn.InstanceNorm2d) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(x, dim=(2, 3), unbiased=False, keepdim=True)
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.view(1, -1, 1, 1)
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias.view(1, -1, 1, 1)
        return torch.addcmul(shift, x, scale)


def channels_last(network: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The network on `device` in channels-last memory format (faster convolutions on CPU and GPU), with instance
    norms that keep that format (ChannelsLastInstanceNorm); changed in place and returned, mode unchanged."""
    for module in list(network.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.InstanceNorm2d and not child.track_running_stats:
                setattr(module, name, ChannelsLastInstanceNorm(child))
    return network.to(device=device, memory_format=torch.channels_last)


def prepare(network: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Ready for scoring and segmentation: channels-last on `device`, in evaluation mode."""
    return channels_last(network, device).eval()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_weights(network: torch.nn.Module, path: str, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Load a state dict (plain, or under "model" as MONAI Label saves it); a mismatch raises a clear error."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable model file ({type(e).__name__}: {e})") from e
    state = state.get("model", state) if isinstance(state, dict) else state
    try:
        network.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: weights do not fit this network (check features and labels): {e}") from e
    return network.to(device)
