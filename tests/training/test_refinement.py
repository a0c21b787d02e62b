import numpy as np
import pytest
from scipy.spatial import cKDTree

from pronet_wsi.geometry import xy_to_index
from pronet_wsi.images import read_labels
from pronet_wsi.training.points import centroids_from_labels, shift_points
from pronet_wsi.training.refinement import RefineConfig, refine_points
from pronet_wsi.training.targets import offset_field


def _cells(points_xy, shape):
    rr, cc = np.indices(shape)
    _, idx = cKDTree(points_xy).query(np.stack([cc.ravel(), rr.ravel()], 1))
    return idx.reshape(shape)


@pytest.mark.data
def test_one_e_step_recovers_shifted_points_with_oracle_offsets(monuseg_dir):
    for name in ("TCGA-18-5592-01Z-00-DX1", "TCGA-KB-A93J-01A-01-TS1"):
        labels = read_labels(monuseg_dir / "labels" / f"{name}.png")
        true_xy, ids = centroids_from_labels(labels)
        true_xy = xy_to_index(true_xy)  # refinement works in the array frame
        dense = np.zeros((labels.max(), 2))
        dense[ids - 1] = true_xy[:, ::-1]
        offsets = offset_field(labels, dense)
        shifted = xy_to_index(shift_points(true_xy + 0.5, 6, 8, labels.shape, seed=3))
        new, moved = refine_points(shifted, _cells(shifted, labels.shape), labels > 0, offsets)
        err = np.hypot(*(new - true_xy).T)
        assert (err < 2).mean() >= 0.9, f"{name}: {(err < 2).mean():.3f}"
        assert np.allclose(moved[moved > 0], np.hypot(*(new - shifted).T)[moved > 0])


def test_delta_rejects_far_candidates():
    fg = np.zeros((40, 40), bool)
    fg[10:20, 10:20] = True
    offsets = np.zeros((2, 40, 40), np.float32)
    rr, cc = np.nonzero(fg)
    offsets[0, rr, cc] = 14.5 - rr
    offsets[1, rr, cc] = 14.5 - cc
    pts = np.array([[20.0, 20.0]])  # 7.8 px from the true centre (14.5, 14.5)
    cells = np.zeros((40, 40), int)
    near, mv = refine_points(pts, cells, fg, offsets, RefineConfig(delta_px=8))
    np.testing.assert_allclose(near[0], [14.5, 14.5], atol=0.6)
    far, mv_far = refine_points(pts, cells, fg, offsets, RefineConfig(delta_px=5))
    np.testing.assert_array_equal(far, pts)
    assert mv_far[0] == 0


def test_empty_cells_keep_their_points():
    pts = np.array([[5.0, 5.0], [30.0, 30.0]])
    fg = np.zeros((40, 40), bool)
    fg[2:9, 2:9] = True
    cells = _cells(pts, fg.shape)
    new, mv = refine_points(pts, cells, fg, np.zeros((2, 40, 40), np.float32))
    np.testing.assert_array_equal(new[1], pts[1])
    assert mv[1] == 0
    none, _ = refine_points(pts, cells, np.zeros_like(fg), np.zeros((2, 40, 40)))
    np.testing.assert_array_equal(none, pts)
