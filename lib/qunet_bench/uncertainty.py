"""MONAI Label-style epistemic uncertainty (Monte Carlo dropout), the baseline QU-net++ is compared with.

Several stochastic passes with dropout on and everything else in evaluation mode, as MONAI Label's
EpistemicScoring runs its `train_mode` inference; each slice scored by the mean entropy (or variance) of its
level-4 probabilities, with EpistemicScoring's formulas.
"""

import numpy as np
import torch

from qunet.disagreement import heads, normalised_chunks


def enable_dropout_only(network: torch.nn.Module) -> torch.nn.Module:
    """eval() everywhere except dropout layers: Monte Carlo dropout, as MONAI Label's train_mode infer."""
    network.eval()
    for m in network.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.train()
    return network


def epistemic_slice_scores(probs: np.ndarray, use_variance: bool = False) -> np.ndarray:
    """Per-slice uncertainty from (passes, N, C, S, S) probabilities, MONAI Label EpistemicScoring's formulas:
    entropy: probabilities <= 0 set to 5e-5, p = mean over passes, sum over channels of -p log p;
    variance: probabilities <= 0 set to 5e-4, variance over passes, summed over channels; then the mean over pixels."""
    probs = np.array(probs, dtype=np.float32)
    if use_variance:
        probs[probs <= 0] = 0.0005
        per_pixel = np.nanvar(probs, axis=0).sum(axis=1)
    else:
        probs[probs <= 0] = 0.00005
        mean = probs.mean(axis=0)
        per_pixel = (-mean * np.log(mean)).sum(axis=1)
    return np.nanmean(per_pixel.reshape(per_pixel.shape[0], -1), axis=1)


@torch.inference_mode()
def mc_dropout_scores(
    network: torch.nn.Module,
    volume: np.ndarray,
    slices: list[int],
    passes: int,
    use_variance: bool,
    patch_size: int,
    device: torch.device,
    seed: int,
) -> np.ndarray:
    """Uncertainty of each given slice from `passes` stochastic level-4 predictions (dropout on), in the order given."""
    enable_dropout_only(network)
    torch.manual_seed(seed)
    scores = []
    for _, x, background in normalised_chunks(volume, list(slices), device):
        probs = torch.stack([torch.sigmoid(heads(network, x, patch_size, background, (-1,))[0]) for _ in range(passes)])
        scores.append(epistemic_slice_scores(probs.float().cpu().numpy(), use_variance))
    network.eval()
    return np.concatenate(scores) if scores else np.zeros(0)
