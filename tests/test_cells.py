"""Cells from nuclei (pronet_wsi/cells.py)."""

import numpy as np
import pytest
import shapely

from pronet_wsi.cells import expand_labels, fit_cells
from pronet_wsi.geometry import Box, Frame
from pronet_wsi.instances import tile_instances
from pronet_wsi.measurements import MeasureConfig
from pronet_wsi.postprocess import Segmentation


def test_two_growing_nuclei_split_halfway_and_stop_at_the_distance():
    lab = np.zeros((20, 40), np.int32)
    lab[8:12, 10:14] = 1  # right edge at column 13
    lab[8:12, 24:28] = 2  # left edge at column 24: the gap 14..23 splits 5 | 5
    cells = expand_labels(lab, 6)
    row = cells[10]
    assert (row[14:19] == 1).all() and (row[19:24] == 2).all()
    assert row[4] == 1 and row[3] == 0  # 6 px out at most
    assert cells[1, 11] == 0 and cells[2, 11] == 1


@pytest.mark.parametrize("seed", range(4))
def test_expand_labels_is_skimages_pixel_for_pixel(seed):
    """Same labels as skimage's expand_labels (scipy's exact feature transform), equidistant pixels included:
    scattered pixels, blocks and distances where many integer distances tie."""
    from skimage.segmentation import expand_labels as reference

    rng = np.random.default_rng(seed)
    for _ in range(60):
        h, w = (int(v) for v in rng.integers(1, 50, 2))
        labels = (rng.random((h, w)) < rng.choice([0.002, 0.02, 0.1, 0.4])) * rng.integers(1, 7, (h, w))
        if rng.random() < 0.4:  # blocks
            labels = np.zeros((h, w), np.int32)
            for k in range(int(rng.integers(1, 6))):
                r, c = rng.integers(0, h), rng.integers(0, w)
                labels[max(r - 3, 0):r + 2, max(c - 2, 0):c + 3] = k + 1
        for distance in (1, 2.5, 5, 8, 50.0):
            assert np.array_equal(expand_labels(labels, distance), reference(labels, distance=distance))
    assert expand_labels(np.zeros((4, 5), np.int32), 3).tolist() == np.zeros((4, 5), int).tolist()


def test_fit_cells_partition_holds_each_nucleus():
    nuclei = np.array([shapely.box(0, 0, 4, 4), shapely.box(5, 0, 9, 4)])
    raw = np.array([shapely.box(-2, -2, 5.2, 6), shapely.box(4.6, -2, 11, 6)])  # overlapping, and over nucleus 2
    cells = fit_cells(nuclei, raw, np.array([[2.0, 2.0], [7.0, 2.0]]))
    assert cells[0].intersection(cells[1]).area == 0
    assert cells[0].contains(nuclei[0]) and cells[1].contains(nuclei[1])
    assert cells[0].intersection(nuclei[1]).area == 0


def test_tile_cells_and_their_measurements():
    lab = np.zeros((60, 80), np.int32)
    yy, xx = np.mgrid[:60, :80]
    lab[(yy - 30) ** 2 + (xx - 25) ** 2 <= 36] = 1
    lab[(yy - 30) ** 2 + (xx - 45) ** 2 <= 36] = 2
    seg = Segmentation(lab.astype(np.uint32), np.array([[30, 25], [30, 45]]), np.ones(2, np.float32))
    rgb = np.full((60, 80, 3), 230, np.uint8)
    rgb[lab > 0] = (80, 60, 150)
    whole = Box(0, 0, 80, 60)
    inst = tile_instances(seg, (lab > 0).astype(np.float32), whole, whole, Frame(1.0, (60, 80), (60, 80)), 0.5, 8.0,
                          image=rgb, measure=MeasureConfig(cells_um=4.0))  # 8 px
    assert len(inst) == 2 and inst.cell_coords is not None
    cells = [shapely.Polygon(inst.cell(i)) for i in range(2)]
    nuclei = [shapely.Polygon(inst.polygon(i)) for i in range(2)]
    assert cells[0].intersection(cells[1]).area < 1e-9
    assert all(c.contains(n) for c, n in zip(cells, nuclei, strict=True))
    m = inst.measurements(0)
    assert m["Cell: Area"] == round(cells[0].area * 0.25, 4)
    assert m["Cytoplasm: Area"] == round((cells[0].area - nuclei[0].area) * 0.25, 4)
    assert 0 < m["Nucleus/Cell area ratio"] < 1
    assert m["Nucleus: Hematoxylin OD mean"] > 0.3 > m["Cytoplasm: Eosin OD mean"]
    assert m["Area px^2"] == round(nuclei[0].area, 2)
