"""Measurements on shapes and stains with known answers (pronet_wsi/measurements.py)."""

import numpy as np
import pytest
import shapely

from pronet_wsi import measurements as M


def ring_arrays(polys):
    coords, idx = shapely.get_coordinates(shapely.get_exterior_ring(polys), return_index=True)
    return coords, np.concatenate([[0], np.cumsum(np.bincount(idx, minlength=len(polys)))])


def shapes():
    disk = shapely.Point(50, 50).buffer(10, quad_segs=256)
    square = shapely.box(0, 0, 8, 8)
    ellipse = shapely.affinity.scale(shapely.Point(0, 0).buffer(1, quad_segs=256), 12, 4)  # a = 12, b = 4
    rot = shapely.affinity.rotate(ellipse, 30)
    return np.array([disk, square, ellipse, rot])


def test_shape_measurements_of_a_disk_a_square_and_an_ellipse():
    coords, offsets = ring_arrays(shapes())
    m = M.shape_measurements(coords, offsets, um_per_px=0.5)
    assert list(m) == list(M.SHAPE_NAMES)
    area, perim = m["Nucleus: Area"], m["Nucleus: Perimeter"]
    assert area[0] == pytest.approx(np.pi * 100 * 0.25, rel=1e-4)
    assert area[1] == 64 * 0.25 and perim[1] == 32 * 0.5
    assert area[2] == pytest.approx(np.pi * 48 * 0.25, rel=1e-4)
    assert perim[0] == pytest.approx(2 * np.pi * 10 * 0.5, rel=1e-4)
    circ = m["Nucleus: Circularity"]
    assert circ[0] == pytest.approx(1.0, abs=1e-4) and circ[1] == pytest.approx(np.pi / 4)
    assert m["Nucleus: Max caliper"][:3] == pytest.approx([10, 8 * np.sqrt(2) * 0.5, 12], rel=1e-4)
    assert m["Nucleus: Min caliper"][:3] == pytest.approx([10, 4, 4], rel=1e-4)
    ecc = m["Nucleus: Eccentricity"]
    assert ecc[0] == pytest.approx(0, abs=1e-3) and ecc[1] == pytest.approx(0, abs=1e-9)
    assert ecc[2] == pytest.approx(np.sqrt(1 - (4 / 12) ** 2), rel=1e-4) and ecc[3] == pytest.approx(ecc[2])
    assert m["Nucleus: Solidity"][:3] == pytest.approx([1, 1, 1], rel=1e-4)
    assert all(np.isclose(m[k][3], m[k][2], rtol=1e-4) for k in M.SHAPE_NAMES)  # rotation changes nothing


def test_area_is_the_shoelace_area_and_solidity_sees_a_notch():
    ell = shapely.Polygon([(0, 0), (10, 0), (10, 10), (5, 10), (5, 5), (0, 5), (0, 0)])
    coords, offsets = ring_arrays(np.array([ell]))
    m = M.shape_measurements(coords, offsets, um_per_px=1.0)
    assert m["Nucleus: Area"][0] == ell.area == 75
    assert m["Nucleus: Solidity"][0] == pytest.approx(75 / 87.5)


def test_measurement_names_per_level():
    assert M.measurement_names("none", True) == ()
    assert M.measurement_names("basic", False) == M.SHAPE_NAMES
    assert M.measurement_names("all", True) == (M.SHAPE_NAMES + M.CELL_SHAPE_NAMES + M.STAIN_NAMES
                                                 + M.CELL_STAIN_NAMES)
    with pytest.raises(ValueError, match="none, basic, all"):
        M.measurement_names("some", False)


def test_stain_od_of_known_stains_and_glass():
    """A patch made of a known amount of pure hematoxylin (and of eosin) gives back that amount."""
    mat = M.stain_matrix()

    def patch(amount_h, amount_e):
        od = amount_h * mat[0] + amount_e * mat[1]
        rgb = np.round(255 * 10.0 ** (-od)).astype(np.uint8)
        return np.broadcast_to(rgb, (4, 4, 3))

    h, e = M.stain_od(patch(0.6, 0.0))
    assert np.allclose(h, 0.6, atol=0.01) and np.allclose(e, 0.0, atol=0.01)
    h, e = M.stain_od(patch(0.1, 0.4))
    assert np.allclose(h, 0.1, atol=0.01) and np.allclose(e, 0.4, atol=0.01)
    h, e = M.stain_od(np.full((2, 2, 3), 255, np.uint8))
    assert np.all(h == 0) and np.all(e == 0)
    assert M.HEMATOXYLIN_OD == (0.65111, 0.70119, 0.29049) and M.EOSIN_OD == (0.2159, 0.8012, 0.5581)


def test_stain_stats_are_the_per_label_statistics_of_stain_od():
    """One pass over the labelled pixels gives, bit for bit, the mean, std dev (n - 1), max of hematoxylin and the
    mean of eosin that stain_od's per-pixel values give; labels without pixels (or one pixel: std) are NaN."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    labels = rng.integers(0, 6, (40, 50)).astype(np.int32)
    labels[labels == 4] = 0  # label 4 absent
    labels[labels == 5] = 0
    labels[0, 0] = 5  # label 5: one pixel
    h, e = M.stain_od(image)
    got = M.stain_stats(labels, image, np.array([1, 2, 3, 4, 5, 6]))
    for j, k in enumerate([1, 2, 3]):
        hv, ev = h[labels == k].astype(np.float64), e[labels == k].astype(np.float64)
        assert got["h_mean"][j] == pytest.approx(hv.mean(), rel=1e-12) and got["h_max"][j] == hv.max()
        assert got["h_std"][j] == pytest.approx(hv.std(ddof=1), rel=1e-9)
        assert got["e_mean"][j] == pytest.approx(ev.mean(), rel=1e-12)
    assert np.isnan(got["h_mean"][3]) and np.isnan(got["h_max"][3]) and np.isnan(got["e_mean"][5])
    assert got["h_mean"][4] == h[0, 0] and np.isnan(got["h_std"][4])
    # the per-pixel values themselves: the same float32 as stain_od's matrix product
    sums = M._stain_sums(labels, image, *M.STAIN_TABLES, 5)
    assert sums[3, 1] == h[labels == 1].max() and sums[0].sum() == (labels > 0).sum()


def test_label_sums_match_bincount_and_find_objects():
    from scipy import ndimage as ndi

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 9, (30, 40)).astype(np.int32)
    labels[labels == 7] = 0
    weights = rng.random((30, 40)).astype(np.float32)
    count, total, box = M.label_sums(labels, 8, weights)
    flat = labels.ravel()
    assert count[0] == 0 and count[1:].tolist() == np.bincount(flat, minlength=9)[1:9].tolist()
    inside = flat > 0
    want = np.bincount(flat[inside], weights=weights.ravel()[inside].astype(np.float64), minlength=9)
    assert np.array_equal(total[1:], want[1:])
    for k, sl in enumerate(ndi.find_objects(labels, max_label=8), start=1):
        assert (box[k].tolist() == [0, 0, 0, 0]) if sl is None else \
            (box[k].tolist() == [sl[0].start, sl[1].start, sl[0].stop, sl[1].stop])


def test_names_are_qupaths():
    """As QuPath's cell detection writes them (WatershedCellDetection + ObjectMeasurements; Solidity as in
    QuPath's shape features), prefix "Nucleus: " / "Cell: " / "Cytoplasm: "."""
    assert M.measurement_names("all", True) == (
        "Nucleus: Area", "Nucleus: Perimeter", "Nucleus: Circularity", "Nucleus: Max caliper", "Nucleus: Min caliper",
        "Nucleus: Eccentricity", "Nucleus: Solidity", "Cell: Area", "Cytoplasm: Area", "Nucleus/Cell area ratio",
        "Nucleus: Hematoxylin OD mean", "Nucleus: Hematoxylin OD std dev", "Nucleus: Hematoxylin OD max",
        "Nucleus: Eosin OD mean", "Cell: Eosin OD mean", "Cytoplasm: Eosin OD mean")
