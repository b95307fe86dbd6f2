"""Pseudo-labels for the neighbours of annotated lesion slices (qunet.neighbours), with a real U-net++."""

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_dilation

from qunet.neighbours import MARGIN, neighbour_slices, neighbour_targets
from qunet.network import build_network, prepare
from qunet.slices import Intensity


def _stack(depth: int = 10, size: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    volume = rng.normal(100, 10, (size, size, depth)).astype(np.float32)
    label = np.zeros(volume.shape, np.uint8)
    label[10:16, 12:20, 2] = 1  # lesion slices 2, 7 and 8; slice 5 annotated without lesion
    label[20:30, 5:9, 7] = 1
    label[22:28, 6:8, 8] = 1
    label[0:5, 0:5, 4] = 1  # lesion on a slice nobody annotated: never lent
    return volume, label


def test_only_lesion_slices_lend_and_only_to_unannotated_neighbours():
    _, label = _stack()
    assert neighbour_targets(label, [2, 5, 7, 8]) == {1: 2, 3: 2, 6: 7, 9: 8}
    assert neighbour_targets(label, [5]) == {}
    assert neighbour_targets(label, [2, 3]) == {1: 2}  # 3 holds no lesion: it lends nothing and takes nothing


def test_copy_lends_the_annotated_label_on_the_neighbours_own_image():
    volume, label = _stack()
    out = neighbour_slices(volume, label, [2, 5, 7, 8], 1, "s", "copy")
    assert [s.index for s in out] == [1, 3, 6, 9]
    intensity = Intensity.of(volume)
    for s, lender in zip(out, (2, 2, 7, 8)):
        np.testing.assert_array_equal(s.target[0], label[:, :, lender] > 0)
        np.testing.assert_allclose(s.image[0], intensity.apply(volume[:, :, s.index]))
        assert s.stack == "s"
    assert neighbour_slices(volume, label, [2, 5, 7, 8], 1, "s", "off") == []
    assert neighbour_slices(volume, label, [2, 5, 7, 8], 1, "s", "model", network=None) == []
    with pytest.raises(ValueError, match="one of"):
        neighbour_slices(volume, label, [2], 1, "s", "nearest")


def _network_that_answers(lesion: bool) -> torch.nn.Module:
    """A real U-net++ whose level-4 output is lesion everywhere or nowhere: its last layer's bias far off zero."""
    network = build_network((4, 4, 8, 8, 16, 4))
    with torch.no_grad():
        network.final_conv_0_4.weight.zero_()
        network.final_conv_0_4.bias.fill_(10.0 if lesion else -10.0)
    return prepare(network, torch.device("cpu"))


def test_model_keeps_its_segmentation_only_within_reach_of_the_annotated_lesion():
    volume, label = _stack()
    out = neighbour_slices(volume, label, [2, 5, 7], 1, "s", "model", _network_that_answers(True), 32)
    assert [s.index for s in out] == [1, 3, 6, 8]
    for s, lender in zip(out, (2, 2, 7, 7)):
        np.testing.assert_array_equal(s.target[0], binary_dilation(label[:, :, lender] > 0, iterations=MARGIN))
    # where the model finds nothing near the annotation, the neighbour gets no label (not an empty one)
    assert neighbour_slices(volume, label, [2, 5, 7], 1, "s", "model", _network_that_answers(False), 32) == []
