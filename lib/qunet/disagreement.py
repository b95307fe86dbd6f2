"""QU-net++'s quality index Q = Jaccard(L3 > 0.5, L4 > 0.5) per slice, and level-4 segmentation of a stack."""

from collections.abc import Iterator

import numpy as np
import torch

from qunet.quality import scale_to_unit, stack_range
from qunet.slices import from_network, to_network


def jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample Jaccard of two boolean (N, ...) masks; two empty masks agree fully (Q = 1)."""
    a, b = a.flatten(1), b.flatten(1)
    inter = (a & b).sum(1).double()
    union = (a | b).sum(1).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


class ChannelsLastInstanceNorm(torch.nn.Module):
    """InstanceNorm2d (no running statistics) computed in the input's memory format.

    torch's instance_norm reshapes its input into one batch_norm call, which copies a channels-last tensor to
    contiguous and returns a contiguous one, so every following convolution converts it back: on CPU these copies
    cost more than the convolutions. Here the statistics come from one var_mean and the output from one fused
    multiply-add, in place in channels-last. Same parameters (and state-dict keys) as the module it replaces;
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


def _channels_last_norms(network: torch.nn.Module) -> torch.nn.Module:
    for module in list(network.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.InstanceNorm2d and not child.track_running_stats:
                setattr(module, name, ChannelsLastInstanceNorm(child))
    return network


def prepare(network: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Evaluation mode on `device`, channels-last (faster convolutions on CPU and GPU), with instance norms that
    keep that memory format (see ChannelsLastInstanceNorm); the network is changed in place and returned."""
    return _channels_last_norms(network).to(device=device, memory_format=torch.channels_last).eval()


def _batches(
    volume: np.ndarray, slices: list[int], image_size: int, batch_size: int, device: torch.device
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Scaled, resized slices a batch at a time: memory is bounded by the batch, not the stack's depth."""
    lo, hi = stack_range(volume)
    for start in range(0, len(slices), batch_size):
        chunk = slices[start : start + batch_size]
        x = to_network(scale_to_unit(volume[:, :, chunk], lo, hi), image_size)
        yield chunk, x.to(device=device, memory_format=torch.channels_last)


# On CPU, forward calls of about one 256x256 slice's worth of pixels were fastest (measured on 2 AVX-512 cores:
# 1 slice at 256 px, 4 at 128 px, 16 at 64 px; larger batches spill the caches); GPUs take the whole batch.
CPU_PIXELS_PER_CALL = 1 << 16


def _heads(network: torch.nn.Module, x: torch.Tensor, which: tuple[int, ...]) -> list[torch.Tensor]:
    """The selected output heads for a batch; on CPU the network runs on cache-sized pieces of the batch."""
    step = len(x) if x.device.type != "cpu" else max(1, CPU_PIXELS_PER_CALL // (x.shape[-1] * x.shape[-2]))
    if step >= len(x):
        out = network(x)
        return [out[i] for i in which]
    parts = [network(x[i : i + step]) for i in range(0, len(x), step)]
    return [torch.cat([p[i] for p in parts]) for i in which]


Q_TOLERANCE = 0.01  # reduced precision may move no slice's Q further than this from the fp32 value


def _q_bounds(l3: torch.Tensor, l4: torch.Tensor, margin: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q from level-3/4 logits, and the lowest and highest Q if every pixel within `margin` of 0 could flip."""
    a, b = l3 > 0, l4 > 0
    q = jaccard(a, b)
    unsure = ((l3.abs() <= margin) | (l4.abs() <= margin)).flatten(1).sum(1).double()
    inter = (a & b).flatten(1).sum(1).double()
    union = (a | b).flatten(1).sum(1).double()
    low = torch.where(union + unsure > 0, (inter - unsure).clamp_min(0) / (union + unsure).clamp_min(1), torch.ones_like(q))
    high = torch.where(union - unsure > 0, ((inter + unsure) / (union - unsure).clamp_min(1)).clamp_max(1), torch.ones_like(q))
    return q, low, high


@torch.inference_mode()
def disagreement_scores(
    network: torch.nn.Module,
    volume: np.ndarray,
    image_size: int,
    batch_size: int = 16,
    slices: list[int] | None = None,
    device: torch.device | None = None,
    precision: str = "fp32",
) -> np.ndarray:
    """Q per slice of a (X, Y, Z) stack, from one forward pass per batch (levels 3 and 4); NaN where not scored.

    precision="bf16" runs the network under bfloat16 autocast (faster on CPUs with AVX512-BF16/AMX and on GPUs).
    The first slice of every batch is also run in fp32: the largest logit change bf16 caused so far, doubled,
    is the margin; a slice whose Q could move by more than Q_TOLERANCE if every pixel within that margin of the
    threshold flipped is re-scored in fp32. So no slice's Q moves by more than Q_TOLERANCE unless bf16 moved a
    logit by over twice as much as on every calibration slice."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    device = device or next(network.parameters()).device
    q = np.full(volume.shape[2], np.nan)
    todo = list(range(volume.shape[2])) if slices is None else list(slices)
    margin = 0.0
    for chunk, x in _batches(volume, todo, image_size, batch_size, device):
        if precision == "fp32":
            l3, l4 = _heads(network, x, (2, 3))
            q[chunk] = jaccard(l3 > 0, l4 > 0).cpu().numpy()  # logit > 0 is sigmoid > 0.5
            continue
        with torch.autocast(device.type, dtype=torch.bfloat16):
            low = [h.float() for h in _heads(network, x, (2, 3))]
        exact = _heads(network, x[:1], (2, 3))
        margin = max(margin, 2 * max(float((lo[:1] - ex).abs().max()) for lo, ex in zip(low, exact)))
        value, q_low, q_high = _q_bounds(low[0], low[1], margin)
        value[0] = jaccard(exact[0] > 0, exact[1] > 0)[0]
        unsafe = ((value - q_low > Q_TOLERANCE) | (q_high - value > Q_TOLERANCE)).nonzero().flatten().tolist()
        unsafe = [i for i in unsafe if i > 0]
        if unsafe:
            l3, l4 = _heads(network, x[unsafe], (2, 3))
            value[unsafe] = jaccard(l3 > 0, l4 > 0)
        q[chunk] = value.cpu().numpy()
    return q


@torch.inference_mode()
def segment(
    network: torch.nn.Module, volume: np.ndarray, image_size: int, batch_size: int = 16, device: torch.device | None = None
) -> np.ndarray:
    """Level-4 label volume with the stack's own (X, Y, Z) shape."""
    device = device or next(network.parameters()).device
    out = np.zeros(volume.shape, np.uint8)
    for chunk, x in _batches(volume, list(range(volume.shape[2])), image_size, batch_size, device):
        out[:, :, chunk] = from_network(torch.sigmoid(_heads(network, x, (3,))[0]), volume.shape[:2])
    return out
