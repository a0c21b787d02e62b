"""Pseudo labels (paper 2.1): geodesic Voronoi partition, V and K, checked against GeodisTK and scipy."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from scipy.spatial import cKDTree
from skimage.measure import label

from pronet_wsi.geometry import xy_to_index
from pronet_wsi.images import read_image, read_labels
from pronet_wsi.synthetic import synthetic_nuclei
from pronet_wsi.training.points import centroids_from_labels
from pronet_wsi.training.pseudolabels import (
    PseudoLabelConfig,
    cluster_label,
    figure_pseudo_labels,
    geodesic_voronoi,
    pseudo_labels,
    voronoi_label,
)

MONUSEG_NAMES = ["TCGA-18-5592-01Z-00-DX1", "TCGA-B0-5711-01Z-00-DX1"]


def monuseg(monuseg_dir, name):
    """(image, centroids_xy) of one MoNuSeg image, points = centroids of its label instances."""
    image = read_image(monuseg_dir / "images" / f"{name}.tif")
    points_xy, _ = centroids_from_labels(read_labels(monuseg_dir / "labels" / f"{name}.png"))
    return image, xy_to_index(points_xy)  # pseudo labels work in the array frame


def real_crop(monuseg_dir, size=160):
    """A size x size crop of a MoNuSeg image and the centroids that fall in it (crop frame)."""
    image, points_xy = monuseg(monuseg_dir, MONUSEG_NAMES[0])
    r0, c0 = 300, 420
    crop = image[r0:r0 + size, c0:c0 + size]
    local = points_xy - [c0, r0]
    keep = (local >= 0).all(1) & (local < size - 0.5).all(1)
    return np.ascontiguousarray(crop), local[keep]


def assert_one_point_per_cell(nearest, points_xy):
    """Every cell (8-connected region of one index) holds exactly one point: its own."""
    seeds_rc = np.rint(points_xy[:, ::-1]).astype(int)
    assert (nearest >= 0).all()
    np.testing.assert_array_equal(nearest[seeds_rc[:, 0], seeds_rc[:, 1]], np.arange(len(points_xy)))
    pieces = label(nearest + 1, background=0, connectivity=2)
    assert pieces.max() == len(points_xy)  # one region per point, no stray fragments
    assert len(np.unique(pieces[seeds_rc[:, 0], seeds_rc[:, 1]])) == len(points_xy)


# --- the geodesic Voronoi partition ------------------------------------------------------------------------


def test_cells_hold_one_point_synthetic():
    image, _, centers_rc = synthetic_nuclei((192, 224), n_nuclei=30, seed=2)
    points_xy = centers_rc[:, ::-1]
    for lam in (0.0, 0.5, 0.8, 1.0):
        distance, nearest = geodesic_voronoi(image, centers_rc, lam)
        assert distance.dtype == np.float32 and nearest.dtype == np.int32
        assert_one_point_per_cell(nearest, points_xy)
        seeds = np.rint(centers_rc).astype(int)
        assert (distance[seeds[:, 0], seeds[:, 1]] == 0).all() and (distance >= 0).all()


@pytest.mark.data
@pytest.mark.parametrize("name", MONUSEG_NAMES)
def test_cells_hold_one_point_monuseg(monuseg_dir, name):
    image, points_xy = monuseg(monuseg_dir, name)
    _, nearest = geodesic_voronoi(image, points_xy[:, ::-1], lam=0.8)
    assert_one_point_per_cell(nearest, points_xy)
    # even the unconverged 2-pass scan (which cuts off fragments) ends with one region per point
    _, nearest2 = geodesic_voronoi(image, points_xy[:, ::-1], lam=0.8, iterations=2)
    assert_one_point_per_cell(nearest2, points_xy)


def test_lam_zero_is_the_euclidean_nearest_point_partition():
    rng = np.random.default_rng(7)
    shape = (300, 400)
    points_rc = rng.uniform(0, 1, (120, 2)) * [shape[0] - 1, shape[1] - 1]
    image = rng.integers(0, 255, shape + (3,), dtype=np.uint8)  # ignored at lam = 0
    distance, nearest = geodesic_voronoi(image, points_rc, lam=0.0)
    seeds = np.rint(points_rc)
    grid = np.indices(shape).reshape(2, -1).T
    d_ref, i_ref = cKDTree(seeds).query(grid)
    agree = nearest.ravel() == i_ref
    assert agree.mean() >= 0.999
    # where the two disagree, both points are (nearly) equally near: a tie, or a pixel cut off from its cell
    # by a tie and handed to the cell it touches; never a clearly wrong cell
    d_ours = np.hypot(*(grid[~agree] - seeds[nearest.ravel()[~agree]]).T)
    np.testing.assert_allclose(d_ours, d_ref[~agree], rtol=0, atol=0.5)
    np.testing.assert_allclose(distance.ravel(), d_ref, rtol=0, atol=1e-4)


def test_geodesic_boundary_follows_the_colour_edge():
    """Two points in regions of different colour. Euclidean: the bisector (column 40). Geodesic: the colour edge
    (column 50), at lam = 0.8 on a clean image; on a noisy one only lam = 1 keeps it there, because below
    lam = 1 a step costs at most 1 / (1 - lam), so a one-pixel edge is no dearer than a few noisy steps."""
    clean = np.full((40, 100, 3), 60, np.uint8)
    clean[:, 50:] = 200
    noisy = np.clip(clean + np.random.default_rng(0).normal(0, 2, clean.shape), 0, 255).astype(np.uint8)
    points_rc = np.array([[20.0, 10.0], [20.0, 70.0]])
    for image, lam in ((clean, 0.8), (noisy, 1.0)):
        _, euclid = geodesic_voronoi(image, points_rc, lam=0.0)
        _, geo = geodesic_voronoi(image, points_rc, lam=lam)
        assert (euclid[:, :40] == 0).all() and (euclid[:, 41:] == 1).all()
        assert (geo[:, :50] == 0).all() and (geo[:, 50:] == 1).all()
    _, geo = geodesic_voronoi(noisy, points_rc, lam=0.8)
    assert abs((geo == 0).sum(1).mean() - 40.5) < 3  # noisy, lam = 0.8: close to Euclidean


def test_no_points_and_outside_points():
    image = np.zeros((20, 30, 3), np.uint8)
    distance, nearest = geodesic_voronoi(image, np.zeros((0, 2)))
    assert (nearest == -1).all() and (distance >= 1e9).all()
    with pytest.raises(ValueError, match="outside the 30x20 image"):
        geodesic_voronoi(image, np.array([[5.0, 29.6]]))
    with pytest.raises(ValueError, match=r"lam=1.5: must be in \[0, 1\]"):
        geodesic_voronoi(image, np.array([[5.0, 5.0]]), lam=1.5)


def test_duplicate_points_first_one_owns_the_pixel():
    image = np.zeros((20, 20, 3), np.uint8)
    _, nearest = geodesic_voronoi(image, np.array([[5.2, 5.0], [4.9, 5.1], [15.0, 15.0]]), lam=0.5)
    assert set(np.unique(nearest)) == {0, 2}


# --- agreement with GeodisTK, the reference the paper used ------------------------------------------------


def _geodistk():
    return pytest.importorskip("GeodisTK", reason="GeodisTK 0.1.7 is the reference; install it with "
                               "CPPFLAGS=-DNPY_IN_ARRAY=NPY_ARRAY_IN_ARRAY pip install --no-build-isolation")


def _relative_error(ours, ref):
    return float((np.abs(ours - ref) / np.maximum(ref, 1e-3)).max())


@pytest.mark.data
@pytest.mark.parametrize("lam, iterations", [(0.8, 2), (0.8, 32), (1.0, 4), (0.3, 2)])
def test_distance_matches_geodistk_one_seed(monuseg_dir, lam, iterations):
    geodistk = _geodistk()
    crop, points_xy = real_crop(monuseg_dir)
    point_rc = points_xy[len(points_xy) // 2, ::-1][None]
    seeds = np.zeros(crop.shape[:2], np.uint8)
    r, c = np.rint(point_rc[0]).astype(int)
    seeds[r, c] = 1
    reference = geodistk.geodesic2d_raster_scan(crop.astype(np.float32), seeds, lam, iterations)
    distance, nearest = geodesic_voronoi(crop, point_rc, lam, iterations)
    assert _relative_error(distance, reference) < 1e-3
    assert (nearest == 0).all()


@pytest.mark.data
@pytest.mark.parametrize("lam, iterations", [(0.8, 2), (0.8, 32), (1.0, 32)])
def test_distance_matches_geodistk_many_seeds(monuseg_dir, lam, iterations):
    """GeodisTK with every point in its seed mask gives the distance to the nearest point: ours, in one sweep."""
    geodistk = _geodistk()
    crop, points_xy = real_crop(monuseg_dir)
    assert len(points_xy) >= 10
    seeds_rc = np.rint(points_xy[:, ::-1]).astype(int)
    mask = np.zeros(crop.shape[:2], np.uint8)
    mask[seeds_rc[:, 0], seeds_rc[:, 1]] = 1
    reference = geodistk.geodesic2d_raster_scan(crop.astype(np.float32), mask, lam, iterations)
    distance, nearest = geodesic_voronoi(crop, points_xy[:, ::-1], lam, iterations)
    assert _relative_error(distance, reference) < 1e-3
    if iterations >= 32:  # converged: each cell's distance is GeodisTK's distance from that cell's point alone
        for k in (0, len(points_xy) // 2):
            one = np.zeros_like(mask)
            one[seeds_rc[k, 0], seeds_rc[k, 1]] = 1
            alone = geodistk.geodesic2d_raster_scan(crop.astype(np.float32), one, lam, iterations)
            cell = nearest == k
            assert _relative_error(distance[cell], alone[cell]) < 1e-3


# --- V and K ----------------------------------------------------------------------------------------------


def test_voronoi_label_edges_points_ignore():
    image, _, centers_rc = synthetic_nuclei((128, 128), n_nuclei=15, seed=3)
    _, nearest = geodesic_voronoi(image, centers_rc, 0.8)
    v = voronoi_label(nearest, centers_rc, point_radius_px=2.0)
    assert v.dtype == np.uint8 and set(np.unique(v)) == {0, 1, 2}
    seeds = np.rint(centers_rc).astype(int)
    assert (v[seeds[:, 0], seeds[:, 1]] == 1).all()
    # background exactly where a 4-neighbour lies in another cell (no disk is that close to an edge here)
    edge = np.zeros(nearest.shape, bool)
    for a, b in ((np.s_[:, 1:], np.s_[:, :-1]), (np.s_[1:], np.s_[:-1])):
        diff = nearest[a] != nearest[b]
        edge[a] |= diff
        edge[b] |= diff
    np.testing.assert_array_equal(v == 0, edge & (v != 1))
    # each disk: 13 pixels for radius 2, all inside its own cell
    fg_cells = nearest[v == 1]
    assert np.bincount(fg_cells, minlength=len(seeds)).max() <= 13
    assert len(np.unique(fg_cells)) == len(seeds)
    v0 = voronoi_label(nearest, centers_rc, point_radius_px=0)
    assert (v0 == 1).sum() == len(seeds)


def test_point_disk_stays_in_its_cell():
    nearest = np.zeros((9, 9), np.int32)
    nearest[:, 5:] = 1
    v = voronoi_label(nearest, np.array([[4.0, 4.0], [4.0, 8.0]]), point_radius_px=3)
    assert (v[:, 5:][v[:, 5:] == 1].size > 0) and (v[:, 4] == 0).sum() < 9  # disk 0 paints over its edge ...
    assert not (v[:, 5] == 1)[[0, 8]].any()
    left_disk = (v == 1) & (nearest == 0)
    assert left_disk[:, :5].sum() == left_disk.sum()  # ... but never into cell 1


def test_cluster_label_puts_points_in_foreground():
    image, labels, centers_rc = synthetic_nuclei((256, 256), n_nuclei=40, seed=1)
    distance, _ = geodesic_voronoi(image, centers_rc, 0.8)
    k = cluster_label(image, distance, d_star=70.0, seed=0)
    assert k.dtype == np.uint8 and set(np.unique(k)) == {0, 1, 2}
    seeds = np.rint(centers_rc).astype(int)
    assert (k[seeds[:, 0], seeds[:, 1]] == 1).mean() >= 0.9
    assert (labels[k == 1] > 0).mean() > 0.8  # foreground is mostly nucleus
    assert (labels[k == 0] == 0).mean() > 0.95  # background is mostly stroma
    assert distance[k == 1].mean() < distance[k == 2].mean() < distance[k == 0].mean()
    np.testing.assert_array_equal(k, cluster_label(image, distance, d_star=70.0, seed=0))


@pytest.mark.data
def test_pseudo_labels_on_monuseg(monuseg_dir):
    name = MONUSEG_NAMES[1]
    image, points_xy = monuseg(monuseg_dir, name)
    truth = read_labels(monuseg_dir / "labels" / f"{name}.png") > 0
    v, k = pseudo_labels(image, points_xy)
    seeds = np.rint(points_xy[:, ::-1]).astype(int)
    assert (k[seeds[:, 0], seeds[:, 1]] == 1).mean() >= 0.9
    assert truth[k == 1].mean() > 0.6 and (~truth[k == 0]).mean() > 0.95
    assert truth[v == 1].mean() > 0.9 and (~truth[v == 0]).mean() > 0.8


def test_pseudo_labels_euclidean_ignores_lam_and_keeps_inputs():
    image, _, centers_rc = synthetic_nuclei((128, 160), n_nuclei=20, seed=5)
    points_xy = centers_rc[:, ::-1].copy()
    before = (image.copy(), points_xy.copy())
    a = pseudo_labels(image, points_xy, PseudoLabelConfig(geodesic=False, lam=0.3))
    b = pseudo_labels(image, points_xy, PseudoLabelConfig(geodesic=False, lam=0.9))
    c = pseudo_labels(image, points_xy, PseudoLabelConfig(lam=0.0))
    for x, y, z in zip(a, b, c, strict=True):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(x, z)
    g = pseudo_labels(image, points_xy)
    assert not np.array_equal(g[0], a[0])  # geodesic edges differ from Euclidean ones
    np.testing.assert_array_equal(image, before[0])
    np.testing.assert_array_equal(points_xy, before[1])


def test_pseudo_labels_refuses_bad_input():
    image = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="no points"):
        pseudo_labels(image, np.zeros((0, 2)))
    with pytest.raises(ValueError, match=r"expected \(H, W, 3\) uint8"):
        pseudo_labels(image.astype(np.float32), np.array([[3.0, 4.0]]))
    with pytest.raises(ValueError, match="outside the 32x32 image"):
        pseudo_labels(image, np.array([[40.0, 4.0]]))


@pytest.mark.parametrize("kwargs, message", [
    ({"lam": -0.1}, "lam=-0.1"), ({"iterations": 0}, "iterations=0"), ({"iterations": 2.5}, "iterations=2.5"),
    ({"d_star": 0}, "d_star=0"), ({"point_radius_px": -1}, "point_radius_px=-1"),
    ({"kmeans_samples": 10}, "kmeans_samples=10"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PseudoLabelConfig(**kwargs)


def test_figure_draws_without_pyplot(tmp_path):
    image, _, centers_rc = synthetic_nuclei((64, 80), n_nuclei=6, seed=0)
    points_xy = centers_rc[:, ::-1]
    v, k = pseudo_labels(image, points_xy)
    fig = figure_pseudo_labels(image, v, k, points_xy, title="test")
    fig.savefig(tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 1000
    assert len(fig.axes) == 3


def test_import_loads_no_plotting_or_learning_library():
    code = ("import sys, pronet_wsi.training.pseudolabels; "
            "print(any(m in sys.modules for m in ('matplotlib', 'matplotlib.pyplot', 'sklearn')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
