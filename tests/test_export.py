import gzip
import json
import uuid

import geojson
import numpy as np
import pytest
import shapely
from wsi_fakes import check_qupath_geojson

from pronet_wsi.export import (
    NUCLEUS_CLASS,
    GeoJSONWriter,
    LabelsWriter,
    Overlay,
    feature_bodies,
    feature_text,
    nucleus_uuid,
    nucleus_uuids,
    read_geojson,
)
from pronet_wsi.geometry import Box, Frame
from pronet_wsi.instances import tile_instances
from pronet_wsi.postprocess import Segmentation
from pronet_wsi.synthetic import synthetic_nuclei


@pytest.fixture(scope="module")
def inst():
    _, lab, centers = synthetic_nuclei((200, 200), n_nuclei=30, seed=2)
    frame = Frame(0.5, (200, 200), (100, 100))  # a 0.5 um/px model on a 0.25 um/px slide: non-integer coords
    seg = Segmentation(lab.astype(np.uint32), centers, np.full(len(centers), 0.8, np.float32))
    return tile_instances(seg, (lab > 0).astype(np.float32), Box(0, 0, 200, 200), Box(0, 0, 200, 200), frame, 0.5,
                          8.0)


def write(path, inst, gz=False, stem="slide"):
    with GeoJSONWriter(path, gz) as w:
        for i, body in enumerate(feature_bodies(inst), start=1):
            w.write(feature_text(nucleus_uuid(stem, i), body))
    return w


def test_round_trip_and_qupath_rules(inst, tmp_path):
    w = write(tmp_path / "a.geojson", inst)
    fc = read_geojson(tmp_path / "a.geojson")
    assert w.count == len(inst) == check_qupath_geojson(fc, (100, 100)) > 20
    for i, f in enumerate(fc["features"]):
        ring = np.asarray(f["geometry"]["coordinates"][0])
        assert np.allclose(ring, np.round(inst.polygon(i), 2))
        assert f["properties"]["measurements"] == pytest.approx(inst.measurements(i))
        assert f["properties"]["classification"] == NUCLEUS_CLASS
    text = (tmp_path / "a.geojson").read_text()
    obj = geojson.loads(text)
    assert obj.is_valid and obj["type"] == "FeatureCollection"
    assert all(shapely.geometry.shape(f["geometry"]).is_valid for f in obj["features"])


def test_gzip_is_the_same_collection_and_deterministic(inst, tmp_path):
    write(tmp_path / "a.geojson", inst)
    write(tmp_path / "b.geojson.gz", inst, gz=True)
    write(tmp_path / "c.geojson.gz", inst, gz=True)
    assert read_geojson(tmp_path / "b.geojson.gz") == read_geojson(tmp_path / "a.geojson")
    assert (tmp_path / "b.geojson.gz").read_bytes() == (tmp_path / "c.geojson.gz").read_bytes()
    assert gzip.decompress((tmp_path / "b.geojson.gz").read_bytes()) == (tmp_path / "a.geojson").read_bytes()


def test_empty_collection_is_valid_json(tmp_path):
    with GeoJSONWriter(tmp_path / "e.geojson"):
        pass
    assert json.loads((tmp_path / "e.geojson").read_text()) == {"type": "FeatureCollection", "features": []}


def test_failed_write_leaves_no_file(inst, tmp_path):
    with pytest.raises(RuntimeError), GeoJSONWriter(tmp_path / "x.geojson") as w:
        w.write(feature_text(nucleus_uuid("s", 1), feature_bodies(inst)[0]))
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_uuids_are_deterministic_and_distinct():
    ids = [nucleus_uuid("slide", i) for i in range(1, 1000)]
    assert len(set(ids)) == 999 and ids[0] == nucleus_uuid("slide", 1) != nucleus_uuid("other", 1)
    assert uuid.UUID(ids[5]).version == 5
    assert nucleus_uuids("slide", 1, 999) == ids  # the batch form: the same strings
    assert nucleus_uuids("ü/x", 98, 5) == [nucleus_uuid("ü/x", i) for i in range(98, 103)]
    assert nucleus_uuids("slide", 7, 0) == []


def test_labels_writer_chunks(tmp_path):
    import zarr

    w = LabelsWriter(tmp_path / "l.zarr", (100, 130), (64, 64), {"mpp": 0.25})
    w.write(64, 64, np.full((36, 64), 7, np.uint32))
    w.write(0, 0, np.zeros((64, 64), np.uint32))
    w.close()
    z = zarr.open_array(str(tmp_path / "l.zarr"))
    assert z.shape == (100, 130) and z.chunks == (64, 64) and z.attrs["mpp"] == 0.25
    assert (z[64:, 64:128] == 7).all() and z[:64].max() == 0
    assert not (tmp_path / ".l.zarr.tmp").exists()


def test_overlay_draws_outlines(inst, tmp_path):
    """Outline pixels (blue) lie on the nuclei's rings and every nucleus gets some; the tissue border is green."""
    from PIL import Image

    ds = 1.0  # the instances span 100 level-0 px: a 100 px thumbnail
    thumb = np.full((100, 100, 3), 255, np.uint8)
    mask = np.pad(np.ones((80, 80), bool), 10)
    bare = Overlay(thumb, ds, mask=mask)
    bare.save(tmp_path / "bare.png")
    ov = Overlay(thumb, ds, mask=mask)
    ov.add(inst)
    ov.save(tmp_path / "o.png")
    blue = (20, 20, 220)
    before = np.asarray(Image.open(tmp_path / "bare.png"))
    arr = np.asarray(Image.open(tmp_path / "o.png"))
    outline = (arr == blue).all(-1)
    assert arr.shape == (100, 100, 3) and not (before == blue).all(-1).any() and outline.sum() > 5 * len(inst)
    assert (before == (0, 160, 0)).all(-1).any()  # the tissue border alone
    rows, cols = np.nonzero(outline)
    on_ring = np.zeros(len(rows), bool)
    for i in range(len(inst)):
        ring = inst.polygon(i) / ds  # (x, y) thumbnail px
        x0, y0 = ring.min(0) - 1.5
        x1, y1 = ring.max(0) + 1.5
        inside = (cols + 0.5 >= x0) & (cols + 0.5 <= x1) & (rows + 0.5 >= y0) & (rows + 0.5 <= y1)
        assert inside.any(), f"nucleus {i} has no outline pixel"
        on_ring |= inside
    assert on_ring.all()  # nothing drawn away from the nuclei


def test_tissue_annotation_is_a_valid_qupath_annotation():
    import shapely

    from pronet_wsi.export import tissue_annotation

    mask = np.zeros((60, 80), bool)
    mask[10:50, 10:70] = True
    mask[20:30, 20:30] = False  # a hole (glass inside tissue)
    mask[52:58, 72:78] = True  # a second piece
    f = tissue_annotation(mask, 16.0, "00000000-0000-0000-0000-000000000001")
    assert f["properties"]["objectType"] == "annotation" and f["properties"]["classification"]["name"] == "Tissue"
    geom = shapely.geometry.shape(f["geometry"])
    assert geom.is_valid and geom.geom_type == "MultiPolygon" and len(geom.geoms) == 2
    expected = (mask.sum()) * 16.0**2
    assert abs(geom.area - expected) / expected < 0.05
    assert geom.bounds[0] >= 10 * 16 - 16 and geom.bounds[2] <= 78 * 16 + 16
    assert not geom.contains(shapely.Point(25 * 16, 25 * 16)) and geom.contains(shapely.Point(40 * 16, 40 * 16))
    assert tissue_annotation(np.zeros((10, 10), bool), 4.0, "x") is None
