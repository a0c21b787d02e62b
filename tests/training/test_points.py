"""Point files in and out (CSV, QuPath GeoJSON), validation against the image, centroids and shift simulation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pronet_wsi.errors import InputError
from pronet_wsi.synthetic import synthetic_nuclei
from pronet_wsi.training.points import (
    centroids_from_labels,
    clip_points,
    read_points,
    shift_points,
    write_points,
)


@pytest.fixture
def points_xy() -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.uniform(0, 1000, (57, 2))


@pytest.mark.parametrize("suffix", [".csv", ".geojson", ".json"])
def test_round_trip_is_exact(tmp_path, points_xy, suffix):
    path = tmp_path / f"pts{suffix}"
    write_points(path, points_xy)
    back = read_points(path)
    assert back.dtype == np.float64 and back.shape == points_xy.shape
    np.testing.assert_array_equal(back, points_xy)


@pytest.mark.parametrize("suffix", [".csv", ".geojson"])
def test_round_trip_empty(tmp_path, suffix):
    path = tmp_path / f"none{suffix}"
    write_points(path, np.zeros((0, 2)))
    assert read_points(path).shape == (0, 2)


def test_csv_extra_columns_any_order_and_blank_lines(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("id,Y,x,class\n1,20.5,10.25,tumour\n\n2,7,3,stroma\n")
    np.testing.assert_array_equal(read_points(path), [[10.25, 20.5], [3.0, 7.0]])


def test_geojson_is_one_qupath_multipoint_annotation(tmp_path, points_xy):
    path = tmp_path / "p.geojson"
    write_points(path, points_xy[:3])
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection" and len(data["features"]) == 1
    feature = data["features"][0]
    assert feature["geometry"]["type"] == "MultiPoint"
    assert feature["properties"]["objectType"] == "annotation"


def test_geojson_qupath_export_shapes(tmp_path):
    """FeatureCollection, single Feature and list of Features; Point and MultiPoint mixed, file order kept."""
    point = {"type": "Feature", "id": "a", "geometry": {"type": "Point", "coordinates": [1.5, 2.5]},
             "properties": {"objectType": "annotation"}}
    multi = {"type": "Feature", "geometry": {"type": "MultiPoint", "coordinates": [[3, 4], [5.0, 6.0, 0.0]]},
             "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [1, 2, 3]}}}
    expected = [[1.5, 2.5], [3, 4], [5, 6]]
    for name, data in [("fc", {"type": "FeatureCollection", "features": [point, multi]}),
                       ("list", [point, multi])]:
        path = tmp_path / f"{name}.geojson"
        path.write_text(json.dumps(data))
        np.testing.assert_array_equal(read_points(path), expected)
    path = tmp_path / "single.geojson"
    path.write_text(json.dumps(multi))
    np.testing.assert_array_equal(read_points(path), expected[1:])


@pytest.mark.parametrize("text, message", [
    ("", "empty file"),
    ("a,b\n1,2\n", "lacks columns x and y"),
    ("x,y\n1,2\n3,oops\n", ":3: bad row '3,oops'"),
    ("x,y\n1,2\n4\n", ":3: bad row"),
    ("x,y\n1,nan\n", ":2: non-finite"),
])
def test_malformed_csv_names_file_and_line(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(InputError, match="bad.csv") as info:
        read_points(path)
    assert message in str(info.value)


def _collection(*geometries):
    return {"type": "FeatureCollection",
            "features": [{"type": "Feature", "geometry": g, "properties": {}} for g in geometries]}


@pytest.mark.parametrize("data, message", [
    (_collection({"type": "Point", "coordinates": [1, 2]}, {"type": "Point", "coordinates": [1, 2]},
                 {"type": "MultiPoint", "coordinates": [[1, 2]]},
                 {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 0]]]}),
     "feature 3 is a Polygon; export point annotations"),
    (_collection({"type": "Point", "coordinates": ["a", 2]}), "feature 0 (Point) has a bad coordinate"),
    (_collection({"type": "MultiPoint", "coordinates": [[1]]}), "feature 0 (MultiPoint) has a bad coordinate"),
    ({"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {}}]},
     "feature 0 has no geometry"),
    ({"type": "Topology"}, "not a GeoJSON FeatureCollection"),
])
def test_malformed_geojson_names_file_and_feature(tmp_path, data, message):
    path = tmp_path / "bad.geojson"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match="bad.geojson") as info:
        read_points(path)
    assert message in str(info.value)


def test_invalid_json_names_line(tmp_path):
    path = tmp_path / "broken.geojson"
    path.write_text('{"type": "FeatureCollection",\n "features": [\n oops]}')
    with pytest.raises(InputError, match=r"broken.geojson:3: not valid JSON"):
        read_points(path)


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        read_points(tmp_path / "absent.csv")
    (tmp_path / "p.txt").write_text("x,y\n1,2\n")
    with pytest.raises(InputError, match="unknown point file type '.txt'"):
        read_points(tmp_path / "p.txt")


def test_clip_points_errors_or_drops():
    pts = np.array([[0.0, 0.0], [99.9, 49.9], [100.0, 10.0], [-0.1, 5.0], [5.0, 50.0]])  # continuous frame
    with pytest.raises(InputError, match=r"pts.csv: 3 of 5 points lie outside the 100x50 image.*--drop-outside"):
        clip_points(pts, (50, 100), source="pts.csv")
    kept, dropped = clip_points(pts, (50, 100), drop_outside=True)
    assert dropped == 3
    np.testing.assert_array_equal(kept, pts[:2])
    kept, dropped = clip_points(pts[:2], (50, 100))
    assert dropped == 0 and len(kept) == 2


def test_centroids_from_labels_in_id_order():
    image, labels, centers_rc = synthetic_nuclei((96, 128), n_nuclei=12, seed=4)
    centers_xy, ids = centroids_from_labels(labels)
    np.testing.assert_array_equal(ids, np.arange(1, len(centers_rc) + 1))
    np.testing.assert_allclose(centers_xy, centers_rc[:, ::-1] + 0.5)  # continuous: pixel [r, c] at (c+.5, r+.5)
    gaps = np.zeros((10, 10), np.uint16)
    gaps[1:3, 1:3] = 7
    gaps[6:9, 5] = 3
    xy, ids = centroids_from_labels(gaps)
    np.testing.assert_array_equal(ids, [3, 7])
    np.testing.assert_allclose(xy, [[5.5, 7.5], [2.0, 2.0]])
    xy, ids = centroids_from_labels(np.zeros((4, 4), int))
    assert xy.shape == (0, 2) and ids.size == 0


def test_shift_points_distance_direction_seed():
    rng = np.random.default_rng(0)
    pts = rng.uniform(100, 900, (2000, 2))
    before = pts.copy()
    moved = shift_points(pts, 2.0, 8.0, (1000, 1000), seed=5)
    np.testing.assert_array_equal(pts, before)  # input untouched
    step = moved - pts
    dist = np.hypot(step[:, 0], step[:, 1])
    assert dist.min() >= 2.0 - 1e-9 and dist.max() <= 8.0 + 1e-9
    assert dist.mean() == pytest.approx(5.0, abs=0.2)  # uniform in [2, 8]
    angle = np.arctan2(step[:, 1], step[:, 0])
    counts = np.histogram(angle, bins=4, range=(-np.pi, np.pi))[0]
    assert counts.min() > 400  # all four quadrants, roughly evenly
    np.testing.assert_array_equal(moved, shift_points(pts, 2.0, 8.0, (1000, 1000), seed=5))
    assert not np.array_equal(moved, shift_points(pts, 2.0, 8.0, (1000, 1000), seed=6))


def test_shift_points_stays_in_image_and_validates():
    corner = np.array([[0.5, 0.5], [49.5, 29.5]])  # centres of the corner pixels
    moved = shift_points(corner, 10.0, 10.0, (30, 50), seed=1)
    assert (moved >= 0.5).all() and (moved[:, 0] <= 49.5).all() and (moved[:, 1] <= 29.5).all()
    np.testing.assert_array_equal(shift_points(corner, 0.0, 0.0, (30, 50)), corner)
    with pytest.raises(ValueError, match="min_px <= max_px"):
        shift_points(corner, 5.0, 2.0, (30, 50))
