import json
from dataclasses import replace

import numpy as np
import pytest
import shapely

from pronet_wsi.geometry import Box, Frame
from pronet_wsi.instances import Instances, tile_instances
from pronet_wsi.postprocess import Segmentation
from pronet_wsi.synthetic import synthetic_nuclei


def instances_of(labels, frame=None, read=None, core=None, radius=8.0, masks=False):
    labels = labels.astype(np.uint32)
    n = int(labels.max())
    h, w = labels.shape
    rows, cols = np.indices(labels.shape)
    cnt = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    centers = np.stack([np.bincount(labels.ravel(), rows.ravel(), n + 1)[1:] / cnt,
                        np.bincount(labels.ravel(), cols.ravel(), n + 1)[1:] / cnt], axis=1)
    frame = frame or Frame(1.0, (h, w), (h, w))
    read = read or Box(0, 0, w, h)
    core = core or read
    seg = Segmentation(labels, centers, np.linspace(0.3, 1, n).astype(np.float32))
    return tile_instances(seg, (labels > 0).astype(np.float32) * 0.9, read, core, frame, 0.25, radius,
                          with_masks=masks)


def polygons(inst: Instances):
    return [shapely.Polygon(inst.polygon(i)) for i in range(len(inst))]


def test_outline_follows_pixel_edges_with_cut_corners():
    lab = np.zeros((12, 12), np.uint32)
    lab[2:7, 3:8] = 1  # 5 x 5 square
    lab[9, 9] = 2  # one pixel
    inst = instances_of(lab)
    sq, px = polygons(inst)
    # within 0.5 px of the chamfered pixel outline, which is within 0.36 px of the pixel edges
    assert sq.hausdorff_distance(shapely.box(3, 2, 8, 7)) <= 0.5 + 0.36 and sq.bounds == (3, 2, 8, 7)
    assert px.is_valid and px.area > 0 and shapely.box(9, 9, 10, 10).contains(px)
    for i in range(2):
        ring = inst.polygon(i)
        assert len(ring) >= 4 and (ring[0] == ring[-1]).all()
    # areas are the polygons' own (QuPath's area of the imported outline), not the pixel counts
    assert inst.area_px.tolist() == [sq.area, px.area] and 0.8 * 25 < sq.area < 25
    assert inst.area_um2.tolist() == pytest.approx([sq.area * 0.0625, px.area * 0.0625])
    assert inst.foreground_mean.tolist() == pytest.approx([0.9, 0.9])


def test_shapes_touching_themselves_at_a_corner_stay_valid():
    lab = np.zeros((10, 10), np.uint32)
    lab[2:5, 2:5] = 1
    lab[3, 3] = 0  # a hole: dropped from the outline
    lab[5, 5] = 1
    lab[5:8, 5] = 1
    lab[5, 4] = 1  # joins (5, 5) to the square 4-connected
    lab[1, 5] = 1
    lab[1, 4] = 1  # a pixel touching the square only at a corner, connected through (1, 4)
    inst = instances_of(lab)
    (poly,) = polygons(inst)
    assert poly.is_valid and len(poly.interiors) == 0


def test_synthetic_nuclei_give_valid_polygons_close_to_their_pixel_area():
    _, lab, _ = synthetic_nuclei((256, 256), n_nuclei=60, seed=3)
    inst = instances_of(lab)
    polys = polygons(inst)
    assert len(polys) == lab.max()
    assert all(p.is_valid and p.geom_type == "Polygon" and len(p.exterior.coords) >= 4 for p in polys)
    areas = np.array([p.area for p in polys])
    assert np.all(np.abs(areas - inst.area_px) <= 0.1 * inst.area_px + 1)


def test_scaled_frame_gives_level0_coordinates_rounded_to_a_hundredth():
    lab = np.zeros((40, 40), np.uint32)
    lab[10:20, 12:25] = 1
    frame = Frame(1.37, (300, 300), (411, 411))
    inst = instances_of(lab, frame=frame, read=Box(100, 200, 140, 240))
    ring = inst.polygon(0)
    assert np.allclose(ring, np.round(ring, 2), atol=1e-9)
    x0, y0, x1, y1 = shapely.Polygon(ring).bounds
    assert (x0, y0, x1, y1) == pytest.approx(((112) * 1.37, 210 * 1.37, 125 * 1.37, 220 * 1.37), abs=0.6)
    assert inst.area_px[0] == pytest.approx(shapely.Polygon(ring).area) == pytest.approx(130 * 1.37**2, rel=0.05)
    assert inst.centers_xy[0] == pytest.approx(((100 + 18.5) * 1.37, (200 + 15) * 1.37))


def test_snapping_rounds_vertices_to_the_grid_and_repairs_what_rounding_breaks():
    from pronet_wsi.instances import GRID_PX, _snap

    ok = shapely.Polygon([(0.123, 0.456), (10.987, 0.111), (5.555, 8.885), (0.125, 4.995)])
    sliver = shapely.Polygon([(0, 0), (10, 0.004), (20, 0)])  # rounds to a line: invalid
    pinch = shapely.Polygon([(0, 0), (2, 0), (2, 1), (1.004, 0.003), (1, 1), (0, 1)])  # rounds to a self-touch
    out = _snap(np.array([ok, sliver, pinch, shapely.Polygon()], object))
    assert shapely.is_valid(out).all()
    c = shapely.get_coordinates(out[0])
    assert np.allclose(c / GRID_PX, np.round(c / GRID_PX), atol=1e-6)
    assert c[0].tolist() == [0.12, 0.46] and c[3].tolist() == [0.13, 5.0]  # half up, as GEOS rounds
    assert out[0].area == pytest.approx(ok.area, rel=1e-3)
    assert out[1].is_empty and out[3].is_empty
    assert not shapely.is_valid(shapely.transform(pinch, lambda x: np.round(x, 2)))  # the case is a real one
    assert out[2].area == pytest.approx(pinch.area, abs=0.01)
    c = shapely.get_coordinates(out[2])
    assert np.allclose(c / GRID_PX, np.round(c / GRID_PX), atol=1e-6)


def test_polygons_are_clipped_to_the_slide():
    lab = np.zeros((60, 60), np.uint32)
    lab[20:40, 45:60] = 1  # runs past the slide's right edge at level-0 x = 50
    inst = instances_of(lab, frame=Frame(1.0, (60, 50), (60, 50)))
    poly = shapely.Polygon(inst.polygon(0))
    assert poly.is_valid and poly.bounds[2] == 50 and poly.bounds[0] == 45


def test_candidates_are_centres_in_the_core_grown_by_the_radius():
    lab = np.zeros((100, 100), np.uint32)
    for k, c in enumerate([5, 25, 45, 62, 75, 90], start=1):  # centres at x = c + 1.5 (3-px squares)
        lab[48:51, c : c + 3] = k
    read, core = Box(0, 0, 100, 100), Box(30, 30, 70, 70)
    inst = instances_of(lab, read=read, core=core, radius=8.0)
    assert inst.centers_xy[:, 0].tolist() == [26.5, 46.5, 63.5, 76.5]
    assert inst.in_core.tolist() == [False, True, True, False]
    assert inst.priority.tolist() == pytest.approx([26.5, 46.5, 36.5, 23.5])


def test_masks_select_and_geometry_text_round_trip():
    _, lab, _ = synthetic_nuclei((128, 128), n_nuclei=20, seed=5)
    inst = instances_of(lab, read=Box(64, 32, 192, 160), masks=True)
    for i in range(len(inst)):
        r0, c0, r1, c1 = inst.bbox[i]
        m = inst.mask(i)
        region = lab[r0 - 32 : r1 - 32, c0 - 64 : c1 - 64]
        ids = np.unique(region[m])
        assert len(ids) == 1 and (region == ids[0]).sum() >= m.sum()
    sub = inst.select(np.arange(len(inst)) % 2 == 0)
    assert len(sub) == (len(inst) + 1) // 2
    assert (sub.polygon(1) == inst.polygon(2)).all() and (sub.mask(1) == inst.mask(2)).all()
    import json

    assert json.loads(inst.geometry_texts()[0]) == [inst.polygon(0).tolist()]


def test_texts_of_all_rings_and_measurements_equal_the_one_at_a_time_ones():
    """The bulk texts (what a tile writes) equal ring_json / measurements of each nucleus, including rings that
    rounding makes invalid (repaired one by one) and a speck too short to be a ring."""
    from pronet_wsi.instances import ring_json, ring_texts

    _, lab, _ = synthetic_nuclei((128, 128), n_nuclei=20, seed=6)
    inst = instances_of(lab, read=Box(0, 0, 128, 128))
    texts = inst.geometry_texts()
    assert len(texts) == len(inst) > 5
    assert texts == [ring_json(inst.polygon(i)) for i in range(len(inst))]
    bowtie_after_rounding = np.array([[0, 0], [1, 0.004], [1, -0.004], [0, 0.001], [0, 0]], float)
    speck = np.array([[5, 5], [5.001, 5], [5, 5]], float)
    square = np.array([[0, 0], [2.5, 0], [2.5, 2.5], [0, 2.5], [0, 0]], float)
    rings = [square, bowtie_after_rounding, speck, square + 0.123]
    coords, offsets = np.concatenate(rings), np.cumsum([0] + [len(r) for r in rings])
    assert ring_texts(coords, offsets) == [ring_json(r) for r in rings]
    assert json.loads(ring_texts(coords, offsets)[0]) == [[[0, 0], [2.5, 0], [2.5, 2.5], [0, 2.5], [0, 0]]]
    for one in ([square], [speck, square + 7], [square + 0.5, speck]):  # a single ring of text (a tile's edge)
        coords, offsets = np.concatenate(one), np.cumsum([0] + [len(r) for r in one])
        assert ring_texts(coords, offsets) == [ring_json(r) for r in one]
    inst = replace(inst, center_score=inst.center_score.copy())
    inst.center_score[1] = np.nan  # left out, as measurements(i) leaves it out
    parsed = [json.loads("{" + t + "}") for t in inst.measurement_texts()]
    assert parsed == [inst.measurements(i) for i in range(len(inst))]
    assert "Center score" not in parsed[1] and len(parsed[1]) == len(parsed[0]) - 1


def test_empty_tile():
    inst = instances_of(np.zeros((50, 50), np.uint32))
    assert len(inst) == 0 and inst.offsets.tolist() == [0]


def test_rounded_rings_stay_valid():
    """Rounding to 0.01 px can make a thin outline touch itself; what is written must still be valid."""
    import shapely

    from pronet_wsi.instances import valid_rounded_ring

    rng = np.random.default_rng(0)
    sliver = np.array([[0, 0], [10, 0.001], [20, 0], [10, 0.004], [0, 0]], float)
    rings = [sliver]
    for _ in range(300):  # thin random star shapes whose vertices nearly meet after rounding
        t = np.sort(rng.uniform(0, 2 * np.pi, 7))
        r = rng.uniform(0.001, 0.02, 7)
        ring = np.stack([np.cos(t) * r, np.sin(t) * r], 1) + rng.uniform(0, 100, 2)
        rings.append(np.vstack([ring, ring[:1]]))
    n_invalid_before = sum(not shapely.Polygon(np.round(r, 2)).is_valid for r in rings)
    assert n_invalid_before > 10
    for r in rings:
        out = valid_rounded_ring(r)
        assert np.array_equal(out, np.round(out, 2))
        assert shapely.Polygon(out).is_valid and shapely.Polygon(out).area > 0
    ok = np.array([[0, 0], [5.004, 0], [5, 5], [0, 5], [0, 0]], float)
    assert np.array_equal(valid_rounded_ring(ok), np.round(ok, 2))
