import numpy as np
import pytest

from qunet.metrics import slice_metrics, stack_metrics


def test_metrics_equal_hand_computed_values():
    pred = np.zeros((4, 5, 3), np.uint8)
    truth = np.zeros((4, 5, 3), np.uint8)
    pred[0, :3, 0] = 1  # tp=2 fp=1
    truth[0, :2, 0] = 1
    truth[1, 0, 0] = 1  # fn=1; tn = 20-4 = 16
    truth[2, 2, 1] = 1  # slice 1: missed lesion
    m = slice_metrics(pred, truth)
    assert m["precision"][0] == pytest.approx(2 / 3)
    assert m["recall"][0] == pytest.approx(2 / 3)
    assert m["jaccard"][0] == pytest.approx(2 / 4)
    assert m["dice"][0] == pytest.approx(4 / 6)
    assert m["accuracy"][0] == pytest.approx(18 / 20)
    assert m["recall"][1] == 0 and m["dice"][1] == 0 and m["precision"][1] == 0
    assert all(m[k][2] == 1 for k in m)  # both empty: full agreement
    s = stack_metrics(pred, truth)  # pooled: tp=2 fp=1 fn=2 tn=55
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(2 / 4)
    assert s["dice"] == pytest.approx(4 / 7) and s["jaccard"] == pytest.approx(2 / 5)
    assert s["accuracy"] == pytest.approx(57 / 60)
    assert slice_metrics(pred, truth)["dice"].mean() == pytest.approx((4 / 6 + 0 + 1) / 3)
