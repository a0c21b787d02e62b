import numpy as np

from pronet_wsi.training.targets import center_heatmap, encode_maps, offset_field


def test_heatmap_peaks_exactly_one_at_rounded_centres_and_truncates():
    heat = center_heatmap(np.array([[10.2, 10.7], [30, 5]]), (40, 40), radius_px=4)
    assert heat.dtype == np.float32
    assert heat[10, 11] == 1.0 and heat[30, 5] == 1.0
    assert (heat == 1.0).sum() == 2
    assert heat[10, 16] == 0  # beyond the radius
    assert 0 < heat[10, 13] < 1


def test_heatmap_point_on_border_and_outside():
    heat = center_heatmap(np.array([[0, 0], [100, 100]]), (10, 10), radius_px=3)
    assert heat[0, 0] == 1.0 and heat.max() == 1.0


def test_offsets_point_to_centre(nuclei):
    _, labels, centers = nuclei
    off = offset_field(labels, centers)
    rr, cc = np.nonzero(labels)
    ids = labels[rr, cc] - 1
    np.testing.assert_allclose(rr + off[0, rr, cc], centers[ids, 0], atol=1e-4)
    np.testing.assert_allclose(cc + off[1, rr, cc], centers[ids, 1], atol=1e-4)
    assert (off[:, labels == 0] == 0).all()


def test_encode_maps_defaults_to_centroids(nuclei):
    _, labels, centers = nuclei
    maps = encode_maps(labels)
    np.testing.assert_allclose(maps["offsets"], offset_field(labels, centers), atol=1e-4)
    assert (maps["foreground"] == (labels > 0)).all()
