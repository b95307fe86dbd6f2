"""The 2D U-net++ with deep supervision (MONAI's BasicUNetPlusPlus) and its loss."""

import contextlib
import io
from collections.abc import Sequence

import torch
from monai.losses import DeepSupervisionLoss, DiceLoss
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


class QUNetLoss(DeepSupervisionLoss):
    """Dice loss on all four heads, equally weighted as in the paper's code; takes the network's own order."""

    def __init__(self) -> None:
        super().__init__(DiceLoss(sigmoid=True, batch=True), weight_mode="same")

    def forward(self, input: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:  # noqa: A002
        return super().forward(list(reversed(input)), target)  # DeepSupervisionLoss wants the main output first


def deep_supervision_loss() -> QUNetLoss:
    return QUNetLoss()


class FinalHead(torch.nn.Module):
    """Wraps the U-net++ so that callers expecting one tensor (inferers, trainers' validation) get level 4."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)[-1]


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
