import numpy as np
import pytest
from scipy import ndimage as ndi

from pronet_wsi.images import read_labels
from pronet_wsi.metrics import evaluate_image
from pronet_wsi.postprocess import PostprocessConfig, find_centers, group_pixels, postprocess
from pronet_wsi.training.targets import encode_maps


def test_round_trip_synthetic(nuclei):
    _, labels, centers_rc = nuclei
    seg = postprocess(encode_maps(labels, centers_rc))
    assert seg.n == labels.max()
    scores = evaluate_image(labels, seg.labels)
    assert scores.aji == pytest.approx(1.0)
    # each instance's centre is the rounded centroid it was encoded from
    for i in range(1, seg.n + 1):
        gt_id = np.bincount(labels[seg.labels == i]).argmax()
        assert np.abs(seg.centers_rc[i - 1] - centers_rc[gt_id - 1]).max() <= 0.5


@pytest.mark.data
def test_round_trip_every_monuseg_label(monuseg_dir):
    for path in sorted((monuseg_dir / "labels").glob("*.png")):
        labels = read_labels(path)
        seg = postprocess(encode_maps(labels))
        aji = evaluate_image(labels, seg.labels).aji
        assert aji >= 0.99, f"{path.name}: AJI {aji:.4f}"


def test_find_centers_threshold_and_plateau():
    heat = np.zeros((20, 20), np.float32)
    heat[5, 5] = 0.9
    heat[10, 10:12] = 0.5  # plateau of two pixels -> one centre
    heat[15, 15] = 0.1  # below the default 0.2
    c = find_centers(heat)
    assert len(c) == 2
    np.testing.assert_allclose(sorted(c.tolist()), [[5, 5], [10, 10.5]])


def test_group_pixels_follows_offsets():
    fg = np.zeros((10, 10), bool)
    fg[2:5, 2:5] = True
    offsets = np.zeros((2, 10, 10), np.float32)
    offsets[1, 2:5, 2:5] = 5.0  # every pixel votes 5 px to the right
    centers = np.array([[3.0, 3.0], [3.0, 8.0]])
    out = group_pixels(fg, offsets, centers)
    assert set(np.unique(out[fg])) == {2}
    assert (out[~fg] == 0).all()


@pytest.mark.parametrize("size", [1, 3, 5])
def test_local_maxima_equal_the_maximum_filter_at_the_candidates(size):
    """The candidate-only comparison is the whole-tile maximum filter (edge mode "nearest"), ties and tile edges
    included: values on a coarse grid make plateaus and equal neighbours common."""
    from scipy import ndimage as ndi

    from pronet_wsi.postprocess import local_maxima

    rng = np.random.default_rng(size)
    values = (rng.integers(0, 6, (60, 45)) / 5).astype(np.float32)
    cand = values > 0.3
    ref = (values == ndi.maximum_filter(values, size=size, mode="nearest")) & cand
    got = local_maxima(values, size, cand)
    assert got.any() and np.array_equal(got, ref)


def test_group_pixels_is_the_nearest_centre_to_every_vote():
    """The grid search gives every vote its nearest centre, near or far (many votes > 4 px from any centre)."""
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(0)
    fg = rng.random((80, 90)) < 0.6
    offsets = rng.normal(0, 6, (2, 80, 90)).astype(np.float32)  # many votes land > 4 px from any centre
    centers = rng.uniform(0, 80, (25, 2))
    out = group_pixels(fg, offsets, centers)
    rows, cols = np.nonzero(fg)
    votes = np.stack([rows + offsets[0, rows, cols], cols + offsets[1, rows, cols]], axis=1)
    dist, _ = cKDTree(centers).query(votes)
    got = np.linalg.norm(votes - centers[out[rows, cols] - 1], axis=1)
    assert (dist > 4).mean() > 0.1 and np.allclose(got, dist)
    assert (out[~fg] == 0).all()


def test_group_pixels_matches_a_brute_force_search_with_ties_and_votes_off_the_grid():
    """Against every vote-centre distance: the nearest centre, the first of equally near ones (integer centres
    and votes make ties), centres and votes beyond the tile's edges, one centre or many."""
    rng = np.random.default_rng(1)
    for trial in range(60):
        h, w = rng.integers(5, 60, 2)
        fg = rng.random((h, w)) < rng.random()
        offsets = rng.normal(0, rng.uniform(0.1, 40), (2, h, w)).astype(np.float32)
        centers = rng.uniform(-20, max(h, w) + 20, (int(rng.integers(1, 30)), 2))
        if trial % 2:
            centers, offsets = np.round(centers), np.round(offsets)
        got = group_pixels(fg, offsets, centers)
        rows, cols = np.nonzero(fg)
        votes = np.stack([rows + offsets[0, rows, cols], cols + offsets[1, rows, cols]], axis=1)
        ref = np.argmin(((votes[:, None, :] - centers[None]) ** 2).sum(-1), axis=1) + 1  # argmin: the first
        assert np.array_equal(got[rows, cols], ref), trial
        assert (got[~fg] == 0).all()


def test_min_area_drops_fragments_and_orphans_become_instances():
    labels = np.zeros((40, 40), np.int64)
    labels[5:15, 5:15] = 1
    labels[25:35, 25:35] = 2
    maps = encode_maps(labels)
    maps["centers"][:] = 0
    maps["centers"][10, 10] = 1.0  # only the first nucleus has a peak
    maps["offsets"][:] = 0
    seg = postprocess(maps, PostprocessConfig(min_area_px=5))
    assert seg.n == 2  # the second becomes its own instance though its peak was missed
    assert seg.center_scores[0] == pytest.approx(1.0) and seg.center_scores[1] == 0
    small = postprocess(maps, PostprocessConfig(min_area_px=101))
    assert small.n == 0


def test_components_grouping_and_empty():
    labels = np.zeros((30, 30), np.int64)
    labels[2:8, 2:8] = 1
    labels[8:14, 2:8] = 2  # touching: components merges them
    assert postprocess(encode_maps(labels), PostprocessConfig(grouping="components")).n == 1
    assert postprocess(encode_maps(labels)).n == 2
    empty = postprocess(encode_maps(np.zeros((30, 30), np.int64)))
    assert empty.n == 0 and empty.labels.dtype == np.uint32


def test_config_validation():
    with pytest.raises(ValueError, match="center_threshold"):
        PostprocessConfig(center_threshold=1.5)
    with pytest.raises(ValueError, match="grouping"):
        PostprocessConfig(grouping="magic")


def test_typed_maps_give_each_instance_the_argmax_of_its_mean_class_probability():
    from pronet_wsi.postprocess import mean_type_probs
    from pronet_wsi.training.targets import encode_maps, instance_centroids

    labels = np.zeros((40, 40), np.uint32)
    labels[5:15, 5:15] = 1
    labels[20:32, 20:32] = 2
    types = np.zeros((3, 40, 40), np.float32)
    types[0] = 1.0
    types[:, labels == 2] = np.array([[0.1], [0.3], [0.6]])
    types[:, 20:22, 20:32] = np.array([0.0, 1.0, 0.0])[:, None, None]  # a sixth of nucleus 2 leans to class 1
    probs = mean_type_probs(labels, types)
    np.testing.assert_allclose(probs[1], [0.1 * 5 / 6, 0.3 * 5 / 6 + 1 / 6, 0.6 * 5 / 6], atol=1e-6)
    maps = {**encode_maps(labels, instance_centroids(labels), 6.0), "types": types}
    seg = postprocess(maps)
    assert seg.n == 2 and seg.type_probs is not None
    order = np.argsort(seg.centers_rc[:, 0])
    assert seg.class_index[order].tolist() == [0, 2]
    np.testing.assert_allclose(seg.class_prob[order], [1.0, 0.5], atol=1e-6)
    untyped = postprocess({k: v for k, v in maps.items() if k != "types"})
    assert untyped.type_probs is None and untyped.class_index.tolist() == [-1, -1]


@pytest.mark.parametrize("field,value", [("min_area_px", float("nan")), ("nms_px", float("nan")),
                                         ("center_threshold", float("nan")), ("min_area_px", float("inf"))])
def test_thresholds_reject_non_finite_values(field, value):
    """Issue 17: a thresholds.json with NaN must not run and find 0 nuclei silently."""
    with pytest.raises(ValueError, match=f"{field}="):
        PostprocessConfig(**{field: value})


def test_class_weights_shift_the_argmax_and_are_checked():
    from pronet_wsi.postprocess import reweight_classes

    probs = np.array([[0.6, 0.4], [0.9, 0.1]], np.float32)
    assert reweight_classes(probs, ()) is probs
    w = reweight_classes(probs, (1.0, 2.0))
    np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-6)
    assert w.argmax(1).tolist() == [1, 0]
    with pytest.raises(ValueError, match="2 classes"):
        reweight_classes(probs, (1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="class_weights"):
        PostprocessConfig(class_weights=(1.0, 0.0))


def test_fragment_centroids_equal_center_of_mass():
    """The fragments' centroids summed over their own pixels equal scipy's pass over the whole tile, bit for bit."""
    from scipy import ndimage as ndi

    from pronet_wsi.postprocess import _fragment_centroids

    rng = np.random.default_rng(0)
    labels = ndi.label(rng.random((120, 170)) > 0.6)[0].astype(np.uint32)
    fragment = rng.random(int(labels.max())) > 0.5
    ref = np.asarray(ndi.center_of_mass(labels > 0, labels, np.nonzero(fragment)[0] + 1), float).reshape(-1, 2)
    assert fragment.sum() > 100
    assert np.array_equal(_fragment_centroids(labels, fragment), ref)


def test_pieces_equal_skimage_labels_in_raster_order_with_areas_and_values():
    """The union-find labelling of equal-valued 4-connected regions numbers them as skimage does (raster order of
    their first pixel) and returns each region's area and value."""
    from skimage.measure import label

    from pronet_wsi.postprocess import _pieces

    rng = np.random.default_rng(3)
    for shape, k in (((60, 70), 4), ((33, 1), 2), ((1, 40), 3), ((80, 80), 2)):
        coarse = rng.integers(0, k, (shape[0] // 4 + 1, shape[1] // 4 + 1))
        assigned = ndi.zoom(coarse, 4, order=0)[: shape[0], : shape[1]]
        assigned = np.where(rng.random(shape) < 0.05, rng.integers(0, k, shape), assigned)  # specks and U-shapes
        got, area, value = _pieces(assigned)
        want = label(assigned, background=0, connectivity=1)
        assert np.array_equal(got, want)
        assert np.array_equal(area, np.bincount(want.ravel(), minlength=want.max() + 1)[1:])
        first = ndi.labeled_comprehension(assigned, want, np.arange(1, want.max() + 1), lambda v: v[0], np.int64, 0)
        assert np.array_equal(value, first)
    empty, area, value = _pieces(np.zeros((5, 6), np.int64))
    assert not empty.any() and len(area) == len(value) == 0


def test_plateau_centroids_equal_8_connected_labels_in_raster_order():
    """Peak groups (plateaus of equal maxima) are the 8-connected components of the peak mask, numbered as
    ``ndi.label`` numbers them, each at its centroid; U- and V-shaped groups merge."""
    from pronet_wsi.postprocess import _plateau_centroids

    rng = np.random.default_rng(5)
    for density in (0.02, 0.2, 0.45):
        peak = rng.random((57, 64)) < density
        peak[10, 10:15] = peak[11, 10] = peak[11, 14] = True  # a U opening downwards... and upwards
        peak[20, 30] = peak[21, 31] = peak[20, 32] = True  # a V joined only diagonally
        comp, n = ndi.label(peak, structure=np.ones((3, 3)))
        want = np.array(ndi.center_of_mass(peak, comp, np.arange(1, n + 1)))
        got = _plateau_centroids(peak)
        assert got.shape == (n, 2) and np.allclose(got, want, rtol=0, atol=1e-9)
    assert _plateau_centroids(np.zeros((4, 4), bool)).shape == (0, 2)
