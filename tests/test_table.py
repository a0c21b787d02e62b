"""The nuclei Parquet table, the split GeoJSON and the cohort summary's means (pronet_wsi/table.py, export.py)."""

import dataclasses
import json

import numpy as np
import pytest
import shapely
from wsi_fakes import OracleModel, block_labels, check_qupath_geojson, write_oracle_slide

from pronet_wsi.export import part_path, read_geojson
from pronet_wsi.measurements import MeasureConfig
from pronet_wsi.tiling import TilingConfig
from pronet_wsi.wsi.cohort import summary_rows
from pronet_wsi.wsi.pipeline import SegmentConfig, segment_slide

pd = pytest.importorskip("pandas")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    _, labels = block_labels((500, 600), block=256, per_block=40, seed=7)
    slide = write_oracle_slide(tmp_path_factory.mktemp("s") / "slide.tif", labels)
    out = tmp_path_factory.mktemp("out")
    cfg = SegmentConfig(tiling=TilingConfig(256, 64), use_tissue_mask=False, measure=MeasureConfig(cells_um=2.0),
                        parquet=True, max_features_per_file=100)
    return segment_slide(slide, out, OracleModel(), cfg), out, slide


def test_parquet_rows_match_the_geojson_parts(run):
    res, out, _ = run
    parts = [part_path(res.geojson, k) for k in range(1, 10) if part_path(res.geojson, k).exists()]
    assert [p.name for p in parts[:2]] == ["slide.geojson", "slide.part2.geojson"]
    features = []
    for p in parts:
        fc = read_geojson(p)
        assert len(fc["features"]) <= 100
        features += fc["features"]
    check_qupath_geojson({"type": "FeatureCollection", "features": features}, (500, 600), cells=True)
    assert len(features) == res.n_nuclei and len(parts) == -(-res.n_nuclei // 100)
    record = json.loads((out / "slide.json").read_text())
    assert record["output"]["geojson_parts"] == [str(p) for p in parts]
    df = pd.read_parquet(out / "slide_nuclei.parquet")
    assert len(df) == res.n_nuclei and df["id"].tolist() == [f["id"] for f in features]
    assert {"centroid_x_px", "centroid_y_um", "class", "class_probability", "Nucleus: Area", "Cell: Area",
            "Nucleus: Hematoxylin OD mean", "geometry", "cell_geometry"} <= set(df.columns)
    polys = shapely.from_wkb(df["geometry"].to_numpy())
    written = [shapely.Polygon(f["geometry"]["coordinates"][0]) for f in features]
    nuclei = [shapely.Polygon(f["nucleusGeometry"]["coordinates"][0]) for f in features]
    assert all(p.equals_exact(n, 1e-9) for p, n in zip(polys, nuclei, strict=True))
    assert all(c.equals_exact(w, 1e-9) for c, w in
               zip(shapely.from_wkb(df["cell_geometry"].to_numpy()), written, strict=True))
    # Area px^2 is the area of the written polygon; the QuPath measurements are those of the GeoJSON
    assert np.allclose(df["Area px^2"], shapely.area(polys), rtol=1e-9, atol=0.01)
    first = features[0]["properties"]["measurements"]
    assert df.iloc[0]["Nucleus: Circularity"] == pytest.approx(first["Nucleus: Circularity"], abs=1e-4)
    assert np.allclose(df["centroid_x_um"], df["centroid_x_px"] * 0.25)
    assert json.loads(__import__("pyarrow.parquet").parquet.read_schema(out / "slide_nuclei.parquet")
                      .metadata[b"geo"])["primary_column"] == "geometry"


def test_summary_reads_the_tables_for_per_slide_means(run):
    res, out, _ = run
    (row,) = summary_rows(out)
    df = pd.read_parquet(out / "slide_nuclei.parquet")
    assert row["mean Nucleus: Area"] == pytest.approx(df["Nucleus: Area"].mean(), rel=1e-5)
    assert row["mean Cell: Eosin OD mean"] == pytest.approx(df["Cell: Eosin OD mean"].mean(), rel=1e-5)


def test_a_rerun_with_fewer_parts_removes_the_old_ones(run, tmp_path):
    res, out, slide = run
    n_parts = len([k for k in range(1, 99) if part_path(res.geojson, k).exists()])
    assert n_parts >= 3
    cfg = SegmentConfig(tiling=TilingConfig(256, 64), use_tissue_mask=False, overwrite=True,
                        max_features_per_file=res.n_nuclei)
    segment_slide(slide, out, OracleModel(), cfg)
    assert res.geojson.exists() and not part_path(res.geojson, 2).exists()
    assert dataclasses.replace(cfg).parquet is False
