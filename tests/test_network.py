import numpy as np
import pytest
import torch

from qunet import build_network, disagreement_scores, segment
from qunet.disagreement import jaccard
from qunet.network import DeepSupervisionDiceCE, load_weights, prepare
from qunet.slices import Intensity, label_channels

TINY = (4, 4, 8, 8, 16, 4)


def test_default_network_size_and_heads():
    net = build_network()
    n = sum(p.numel() for p in net.parameters())
    assert 0.55e6 <= n <= 0.6e6, n  # a quarter of the paper's widths (9.1 M parameters)
    with torch.no_grad():
        heads = net.eval()(torch.zeros(1, 1, 64, 64))
    assert len(heads) == 4 and all(h.shape == (1, 1, 64, 64) for h in heads)


def test_features_must_be_six():
    with pytest.raises(ValueError, match="six"):
        build_network((4, 4, 8))


def test_jaccard_edge_cases():
    a = torch.zeros(3, 1, 4, 4, dtype=torch.bool)
    b = a.clone()
    a[1, 0, 0, 0] = True
    b[1, 0, 0, 0] = True  # identical
    a[2, 0, 0, 0] = True
    b[2, 0, 1, 1] = True  # disjoint
    assert jaccard(a, b).tolist() == [1.0, 1.0, 0.0]
    a[1, 0, 0, 1] = True  # 1 shared of 2
    assert jaccard(a, b)[1] == pytest.approx(0.5)


def test_loss_weights_all_heads_main_first():
    loss = DeepSupervisionDiceCE()
    target = torch.zeros(2, 1, 8, 8)
    target[:, :, 2:6, 2:6] = 1
    good, bad = target * 20 - 10, -target * 20 + 10  # logits
    only_l4_good = loss([bad, bad, bad, good], target)
    only_l1_good = loss([good, bad, bad, bad], target)
    all_good = loss([good] * 4, target)
    assert all_good < only_l4_good and all_good < only_l1_good
    assert only_l4_good == pytest.approx(only_l1_good.item())  # equal weights, as in the paper's code
    empty = torch.zeros(2, 1, 8, 8)  # over the batch: lesion-free patches still pull the output down
    assert loss([bad] * 4, empty) > loss([-torch.ones(2, 1, 8, 8) * 10] * 4, empty)


class FixedHeads(torch.nn.Module):
    """Heads whose masks are known: level 3 thresholds the normalised input at 0.5, level 4 at 0.2."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return [x, x, x - 0.5, x - 0.2]


def test_disagreement_scores_follow_the_heads_over_sliding_windows():
    """Windows of 16 px slide over 40 x 36 slices: a pointwise network's blended output is its output, so Q is the
    Jaccard of the two thresholds of the stack's normalised intensities."""
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(40, 36, 3)).astype(np.float32)
    vol[:, :, 1] = -5.0  # a constant slice (below every threshold): two empty masks agree
    unit = Intensity.of(vol).apply(vol)
    q = disagreement_scores(FixedHeads(), vol, patch_size=16)
    for k in (0, 2):
        assert q[k] == pytest.approx((unit[:, :, k] > 0.5).sum() / (unit[:, :, k] > 0.2).sum(), abs=1e-6)
    assert q[1] == 1.0
    partial = disagreement_scores(FixedHeads(), vol, 16, slices=[2])
    assert np.isnan(partial[:2]).all() and partial[2] == q[2]


def test_segment_returns_the_slices_level4_on_their_own_grid():
    vol = np.zeros((20, 24, 5), np.float32)
    vol[5:15, 5:15, 2] = 1.0
    out = segment(FixedHeads(), vol, patch_size=32)  # slices smaller than a window are padded with background
    assert out.shape == vol.shape and out.dtype == np.uint8
    assert out[5:15, 5:15, 2].all() and out.sum() == 100
    assert segment(FixedHeads(), vol, 32, slices=[2, 0]).shape == (20, 24, 2)


def test_real_network_runs_and_weights_roundtrip(tmp_path):
    net = prepare(build_network(TINY), torch.device("cpu"))
    vol = np.random.default_rng(0).random((40, 30, 7)).astype(np.float32)
    q = disagreement_scores(net, vol, 32)
    assert q.shape == (7,) and np.all((q >= 0) & (q <= 1))
    torch.save({"model": net.state_dict()}, tmp_path / "m.pt")
    again = load_weights(build_network(TINY), str(tmp_path / "m.pt"))
    assert np.allclose(disagreement_scores(prepare(again, torch.device("cpu")), vol, 32), q)


def test_channels_last_norms_match_torchs_instance_norm():
    torch.manual_seed(0)
    plain = build_network(TINY)
    fast = build_network(TINY)
    fast.load_state_dict(plain.state_dict())
    prepare(fast, torch.device("cpu"))
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        for a, b in zip(plain.eval()(x), fast(x.contiguous(memory_format=torch.channels_last))):
            assert torch.allclose(a, b, atol=1e-4)


def test_incompatible_or_corrupt_weights_raise_clearly(tmp_path):
    torch.save({"model": build_network(TINY).state_dict()}, tmp_path / "m.pt")
    with pytest.raises(ValueError, match="do not fit"):
        load_weights(build_network((8, 8, 16, 16, 32, 8)), str(tmp_path / "m.pt"))
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a readable model"):
        load_weights(build_network(TINY), str(tmp_path / "bad.pt"))


def test_training_targets_one_channel_per_label():
    label = np.zeros((8, 8), np.uint8)
    label[:2, :2] = 1
    label[4:, 4:] = 2
    single = label_channels(label, num_labels=1)  # one label: every non-zero value is foreground
    assert single.shape == (1, 8, 8) and single[0].sum() == 4 + 16
    two = label_channels(label, num_labels=2)
    assert two.shape == (2, 8, 8) and two[0].sum() == 4 and two[1].sum() == 16
