"""qunet.postprocess: keeping the largest connected lesion of a segmented stack, and the app's setting for it."""

import numpy as np
import pytest

from qunet.postprocess import largest_component, postprocess


def test_largest_component_keeps_the_biggest_3d_lesion_and_its_labels():
    labels = np.zeros((20, 20, 6), np.uint8)
    labels[2:8, 2:8, 1:4] = 1  # 108 voxels over three slices
    labels[5:7, 5:7, 4] = 2  # touches it diagonally across slices: the same component, its own label kept
    labels[15:18, 15:18, 2] = 1  # 9 voxels, apart
    kept = largest_component(labels)
    assert kept[15:18, 15:18, 2].sum() == 0
    assert (kept[2:8, 2:8, 1:4] == 1).all() and (kept[5:7, 5:7, 4] == 2).all()
    assert kept.dtype == labels.dtype


def test_postprocess_off_and_empty_stacks_are_left_alone():
    labels = np.zeros((8, 8, 3), np.uint8)
    labels[0, 0, 0] = labels[7, 7, 2] = 1
    assert postprocess(labels, "off") is labels
    assert postprocess(np.zeros((4, 4, 2), np.uint8), "largest").sum() == 0
    assert postprocess(labels, "largest").sum() == 1
    with pytest.raises(ValueError, match="largest"):
        postprocess(labels, "biggest")


def test_the_app_refuses_an_unknown_postprocess(app_settings):
    with pytest.raises(ValueError, match="postprocess"):
        app_settings.AppConf.from_conf({"postprocess": "biggest"})
    assert app_settings.AppConf.from_conf({"postprocess": "largest"}).postprocess == "largest"


@pytest.fixture
def app_settings():
    import sys

    from live_server import APP

    sys.path.insert(0, str(APP))
    try:
        from qunet_app import settings

        yield settings
    finally:
        sys.path.remove(str(APP))
