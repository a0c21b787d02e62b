"""`pronet-wsi pseudo-labels IMAGE POINTS -o OUTDIR`: label PNGs, figure, record; one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pronet_wsi.cli import main
from pronet_wsi.images import write_png
from pronet_wsi.synthetic import synthetic_nuclei
from pronet_wsi.training.points import write_points


@pytest.fixture
def inputs(tmp_path):
    image, _, centers_rc = synthetic_nuclei((96, 128), n_nuclei=10, seed=2)
    write_png(tmp_path / "tile.png", image)
    points_xy = centers_rc[:, ::-1]
    write_points(tmp_path / "tile.csv", points_xy + 0.5)  # files hold the continuous frame
    return tmp_path / "tile.png", tmp_path / "tile.csv", points_xy


def test_writes_labels_figure_and_record(tmp_path, inputs):
    image, points, points_xy = inputs
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["pseudo-labels", str(image), str(points), "-o", str(out), "--lam", "0.9"])
    assert result.exit_code == 0, result.output
    assert "10 points" in result.output
    for name in ("voronoi", "cluster"):
        lab = np.asarray(Image.open(out / f"tile_{name}.png"))
        assert lab.dtype == np.uint8 and lab.shape == (96, 128)
        assert set(np.unique(lab)) <= {0, 1, 2} and (lab == 1).any() and (lab == 0).any()
    v = np.asarray(Image.open(out / "tile_voronoi.png"))
    seeds = np.rint(points_xy[:, ::-1]).astype(int)
    assert (v[seeds[:, 0], seeds[:, 1]] == 1).all()
    assert Image.open(out / "tile_pseudolabels.png").size[0] > 500
    record = json.loads((out / "tile_pseudolabels.json").read_text())
    assert record["n_points"] == 10 and record["config"]["lam"] == 0.9 and record["config"]["geodesic"]


def test_euclidean_flag(tmp_path, inputs):
    image, points, _ = inputs
    result = CliRunner().invoke(main, ["pseudo-labels", str(image), str(points), "-o", str(tmp_path / "e"),
                                       "--euclidean"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "e" / "tile_pseudolabels.json").read_text())["config"]["geodesic"] is False


def test_points_outside_fail_or_drop(tmp_path, inputs):
    image, _, points_xy = inputs
    outside = tmp_path / "outside.geojson"
    write_points(outside, np.vstack([points_xy + 0.5, [[500.0, 5.0]]]))
    runner = CliRunner()
    result = runner.invoke(main, ["pseudo-labels", str(image), str(outside), "-o", str(tmp_path / "x")])
    assert result.exit_code == 1
    assert "1 of 11 points lie outside the 128x96 image" in result.output and "--drop-outside" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "x" / "tile_voronoi.png").exists()
    result = runner.invoke(main, ["pseudo-labels", str(image), str(outside), "-o", str(tmp_path / "y"),
                                  "--drop-outside"])
    assert result.exit_code == 0, result.output
    assert "1 outside the image dropped" in result.output


@pytest.mark.parametrize("content, message", [
    ('{"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {}, "geometry": '
     '{"type": "Polygon", "coordinates": [[[0, 0], [5, 0], [5, 5], [0, 0]]]}}]}',
     "feature 0 is a Polygon; export point annotations"),
    ('{"type": "FeatureCollection", "features": []}', "no points inside the image"),
])
def test_bad_points_give_one_line_error(tmp_path, inputs, content, message):
    image, _, _ = inputs
    bad = tmp_path / "bad.geojson"
    bad.write_text(content)
    result = CliRunner().invoke(main, ["pseudo-labels", str(image), str(bad), "-o", str(tmp_path / "z")])
    assert result.exit_code == 1
    assert message in result.output and "bad.geojson" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_bad_lam_is_one_line_error(tmp_path, inputs):
    image, points, _ = inputs
    result = CliRunner().invoke(main, ["pseudo-labels", str(image), str(points), "-o", str(tmp_path / "z"),
                                       "--lam", "2"])
    assert result.exit_code == 1 and "lam=2.0: must be in [0, 1]" in result.output
