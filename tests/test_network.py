import numpy as np
import pytest
import torch

from qunet import build_network, deep_supervision_loss, disagreement_scores, segment
from qunet.disagreement import jaccard, prepare
from qunet.network import FinalHead, load_weights

TINY = (4, 4, 8, 8, 16, 4)


def test_default_network_size_and_heads():
    net = build_network()
    n = sum(p.numel() for p in net.parameters())
    assert 9.0e6 <= n <= 9.2e6, n
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
    loss = deep_supervision_loss()
    target = torch.zeros(2, 1, 8, 8)
    target[:, :, 2:6, 2:6] = 1
    good, bad = target * 20 - 10, -target * 20 + 10  # logits
    only_l4_good = loss([bad, bad, bad, good], target)
    only_l1_good = loss([good, bad, bad, bad], target)
    all_good = loss([good] * 4, target)
    assert all_good < only_l4_good and all_good < only_l1_good
    assert only_l4_good == pytest.approx(only_l1_good.item())  # equal weights, as in the paper's code


class FixedHeads(torch.nn.Module):
    """Heads whose masks are known: level 3 thresholds at 0.5, level 4 at 0.4 of the input."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return [x, x, x - 0.5, x - 0.4]


def test_disagreement_scores_follow_the_heads():
    vol = np.zeros((16, 16, 3), np.float32)
    vol[:, :, 0] = np.linspace(0, 1, 16)[:, None]  # bands 0.4-0.5 differ between the heads
    vol[:4, :4, 1] = 1.0  # both heads agree
    vol[0, 0, 2] = 1.0  # a tiny bright spot with the rest zero
    q = disagreement_scores(FixedHeads(), vol, image_size=16, batch_size=2)
    x = np.linspace(0, 1, 16)
    assert q[0] == pytest.approx((x > 0.5).sum() / (x > 0.4).sum())
    assert q[1] == 1.0 and q[2] == 1.0
    partial = disagreement_scores(FixedHeads(), vol, 16, 2, slices=[0])
    assert np.isnan(partial[1:]).all() and partial[0] == q[0]


def test_segment_returns_stack_shape_and_level4():
    vol = np.zeros((20, 24, 5), np.float32)
    vol[5:15, 5:15, 2] = 1.0
    out = segment(FixedHeads(), vol, image_size=16)
    assert out.shape == vol.shape and out.dtype == np.uint8
    assert out[:, :, 2].sum() > 50 and out[:, :, [0, 1, 3, 4]].sum() == 0


def test_real_network_runs_batched_and_weights_roundtrip(tmp_path):
    net = prepare(build_network(TINY), torch.device("cpu"))
    vol = np.random.default_rng(0).random((40, 30, 7)).astype(np.float32)
    q = disagreement_scores(net, vol, 32, batch_size=3)
    assert q.shape == (7,) and np.all((q >= 0) & (q <= 1))
    torch.save({"model": net.state_dict()}, tmp_path / "m.pt")
    again = load_weights(build_network(TINY), str(tmp_path / "m.pt"))
    assert np.allclose(disagreement_scores(prepare(again, torch.device("cpu")), vol, 32, 3), q)
    assert FinalHead(net)(torch.zeros(1, 1, 32, 32)).shape == (1, 1, 32, 32)


def test_incompatible_or_corrupt_weights_raise_clearly(tmp_path):
    torch.save({"model": build_network(TINY).state_dict()}, tmp_path / "m.pt")
    with pytest.raises(ValueError, match="do not fit"):
        load_weights(build_network((8, 8, 16, 16, 32, 8)), str(tmp_path / "m.pt"))
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a readable model"):
        load_weights(build_network(TINY), str(tmp_path / "bad.pt"))


def test_training_targets_one_channel_per_label():
    from qunet.slices import labels_to_network

    label = np.zeros((8, 8, 2), np.uint8)
    label[:2, :2, 0] = 1
    label[4:, 4:, 0] = 2
    single = labels_to_network(label, 8, num_labels=1)
    assert single.shape == (2, 1, 8, 8) and single[0, 0].sum() == 4 + 16 and single[1].sum() == 0
    two = labels_to_network(label, 8, num_labels=2)
    assert two[0, 0].sum() == 4 and two[0, 1].sum() == 16
