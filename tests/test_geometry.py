import numpy as np
import pytest

from pronet_wsi.geometry import Box, Frame, best_level, rc_to_xy


def test_box_basics_and_half_open_containment():
    b = Box(10, 20, 30, 60)
    assert (b.width, b.height, b.shape, b.area) == (20, 40, (40, 20), 800)
    inside = b.contains_xy(np.array([[10, 20], [29.999, 59.999], [30, 40], [20, 60], [9.99, 30]]))
    assert inside.tolist() == [True, True, False, False, False]
    assert b.expand(5) == Box(5, 15, 35, 65)
    assert b.expand(-100).is_empty
    assert b.intersect(Box(25, 0, 100, 30)) == Box(25, 20, 30, 30)
    assert b.intersect(Box(100, 100, 200, 200)).is_empty
    assert b.shift(1, 2) == Box(11, 22, 31, 62) and b.scale(2) == Box(20, 40, 60, 120)
    with pytest.raises(ValueError):
        Box(5, 0, 4, 1)


def test_edge_distance_is_min_over_sides_and_negative_outside():
    b = Box(0, 0, 100, 50)
    d = b.edge_distance(np.array([[50, 25], [3, 25], [50, 49], [-2, 10]]))
    assert d.tolist() == [25, 3, 1, -2]


def test_frame_scale_and_round_trip():
    f = Frame.for_slide((1000, 1500), slide_mpp=0.5, model_mpp=0.25)
    assert f.scale == 0.5 and f.shape == (2000, 3000)
    xy = np.array([[10.5, 3.25]])
    assert np.allclose(f.from_level0(f.to_level0(xy)), xy)
    assert f.box_to_level0(Box(0, 0, 100, 100)) == Box(0, 0, 50, 50)
    # a 0.05 % mpp difference is no resampling at all
    assert Frame.for_slide((100, 100), 0.2501, 0.25).scale == 1.0
    down = Frame.for_slide((1001, 999), slide_mpp=0.25, model_mpp=0.5)
    assert down.scale == 2.0 and down.shape == (501, 500)  # covers the whole level-0 region
    with pytest.raises(ValueError):
        Frame.for_slide((10, 10), 0.0, 0.25)


def test_rc_to_xy_uses_pixel_centres():
    assert rc_to_xy(np.array([[0, 0], [2, 5]]), (100, 10)).tolist() == [[100.5, 10.5], [105.5, 12.5]]


@pytest.mark.parametrize("target,expected", [(1.0, 0), (1.9, 0), (2.0, 1), (3.9, 1), (4.0, 2), (100, 3), (0.5, 0)])
def test_best_level_is_the_coarsest_fine_enough(target, expected):
    assert best_level((1.0, 2.0005, 4.001, 16.0), target) == expected
