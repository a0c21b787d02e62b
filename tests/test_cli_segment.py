"""The `segment` command end to end: real slides with a tiny random PRONet (plumbing, not accuracy)."""

import json
import shutil
from pathlib import Path

import geojson
import numpy as np
import pytest
import shapely
import torch
from click.testing import CliRunner
from wsi_fakes import check_qupath_geojson, cli_run, small_slide

from pronet_wsi.cli import main
from pronet_wsi.export import read_geojson
from pronet_wsi.model import ModelConfig, PRONet, save_model
from pronet_wsi.slide import write_pyramid_tiff


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random PRONet at 2 um/px whose head biases make it call some nuclei."""
    torch.manual_seed(0)
    net = PRONet(ModelConfig(width=0.0625, mpp=2.0)).eval()
    with torch.no_grad():
        net.head_center.bias.fill_(-0.5)
        net.head_binary.bias.fill_(0.5)
    return save_model(net, tmp_path_factory.mktemp("model"))


def run(*args):
    return CliRunner().invoke(main, ["segment", *[str(a) for a in args]])


def check_slide_output(path, shape_hw):
    text = path.read_text()
    obj = geojson.loads(text)
    assert obj.is_valid
    fc = json.loads(text)
    n = check_qupath_geojson(fc, shape_hw)
    assert all(shapely.geometry.shape(f["geometry"]).is_valid for f in obj["features"])
    return n


@pytest.mark.data
def test_real_slides_missing_mpp_then_success(slides_dir, model_dir, tmp_path):
    cmu, tcga = slides_dir / "CMU-1-Small-Region.svs", slides_dir / "TCGA-CR-7395-01A-01-TS1.svs"
    common = ["-o", tmp_path, "-m", model_dir, "--tile-px", 256, "--halo-px", 32, "--quiet"]
    res = run(cmu, tcga, *common)
    assert res.exit_code == 1
    errors = [line for line in res.output.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and "TCGA-CR-7395" in errors[0] and "--mpp" in errors[0]
    assert "CMU-1-Small-Region.svs:" in res.output and "nuclei" in res.output
    assert not (tmp_path / "TCGA-CR-7395-01A-01-TS1.geojson").exists()
    assert check_slide_output(tmp_path / "CMU-1-Small-Region.geojson", (2967, 2220)) > 0
    res = run(tcga, *common, "--mpp", 0.5)
    assert res.exit_code == 0, res.output
    assert check_slide_output(tmp_path / "TCGA-CR-7395-01A-01-TS1.geojson", (3567, 4443)) > 0
    record = json.loads((tmp_path / "TCGA-CR-7395-01A-01-TS1.json").read_text())
    assert record["slide"]["mpp_source"] == "--mpp"
    assert record["counts"]["tiles_tissue"] < record["counts"]["tiles_grid"]
    # a rerun skips both finished slides
    res = run(cmu, tcga, *common, "--mpp", 0.5)
    assert res.exit_code == 0 and res.output.count("skipped") == 2


def test_bad_inputs_are_reported_and_skipped(model_dir, tmp_path):
    good = tmp_path / "good.tif"
    rng = np.random.default_rng(0)
    img = np.full((300, 300, 3), (230, 180, 210), np.uint8)
    img[rng.random((300, 300)) < 0.05] = (80, 40, 120)
    write_pyramid_tiff(good, img, 0.5, tile_px=128, compression="zlib")
    text = tmp_path / "text.svs"
    text.write_text("hello\n")
    cut = tmp_path / "cut.tif"
    cut.write_bytes(good.read_bytes()[:4000])
    out = tmp_path / "out"
    res = run(cut, text, tmp_path / "missing.svs", good, "-o", out, "-m", model_dir, "--tile-px", 256,
              "--halo-px", 32, "--quiet")
    assert res.exit_code == 1
    errors = [line for line in res.output.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 3
    for name, words in (("cut.tif", ("damaged", "truncated")), ("text.svs", ("cannot be read",)),
                        ("missing.svs", ("not found",))):
        assert any(name in e and any(w in e for w in words) for e in errors), errors
    # the failed slides leave only a run record saying so (for `pronet-wsi summary`), no GeoJSON
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == \
        ["cut.json", "good.geojson", "good.json", "good_overlay.png", "good_tissue.png", "missing.json", "text.json"]
    for name in ("cut", "missing", "text"):
        record = json.loads((out / f"{name}.json").read_text())
        assert record["status"] == "failed" and f"{name}." in record["error"]
    assert "3 of 4 slides failed" in res.output


def test_unwritable_output_folder_is_a_one_line_error(model_dir, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    res = run(tmp_path / "whatever.svs", "-o", blocker / "out", "-m", model_dir)
    assert res.exit_code != 0 and "not writable" in res.output and len(res.output.strip().splitlines()) == 1


def test_white_slide_gzip_labels_and_overwrite(model_dir, tmp_path):
    white = tmp_path / "white.tif"
    write_pyramid_tiff(white, np.full((256, 256, 3), 255, np.uint8), 0.25, compression="zlib", levels=1)
    res = run(white, "-o", tmp_path / "o", "-m", model_dir, "--gzip", "--labels-zarr", "--quiet")
    assert res.exit_code == 0, res.output
    assert "no tissue" in res.output
    assert read_geojson(tmp_path / "o" / "white.geojson.gz") == {"type": "FeatureCollection", "features": []}
    assert (tmp_path / "o" / "white_labels.zarr").is_dir()
    res = run(white, "-o", tmp_path / "o", "-m", model_dir, "--gzip", "--overwrite", "--no-tissue-mask", "--quiet")
    assert res.exit_code == 0 and "skipped" not in res.output


def test_demo_slide_quick_start(model_dir, tmp_path):

    demo = Path(__file__).resolve().parents[1] / "examples" / "demo_slide.tif"
    if not demo.exists():
        pytest.skip("examples/demo_slide.tif not generated")
    shutil.copy(demo, tmp_path / "demo_slide.tif")
    res = run(tmp_path / "demo_slide.tif", "-o", tmp_path / "out", "-m", model_dir, "--tile-px", 256,
              "--halo-px", 32, "--workers", 2)
    assert res.exit_code == 0, res.output
    assert check_slide_output(tmp_path / "out" / "demo_slide.geojson", (2048, 2048)) > 0


def test_cells_measurements_parquet_and_parts_from_the_command_line(model_dir, tmp_path):
    pd = pytest.importorskip("pandas")
    slide = tmp_path / "good.tif"
    rng = np.random.default_rng(0)
    img = np.full((300, 300, 3), (230, 180, 210), np.uint8)
    img[rng.random((300, 300)) < 0.05] = (80, 40, 120)
    write_pyramid_tiff(slide, img, 0.5, tile_px=128, compression="zlib")
    out = tmp_path / "out"
    res = run(slide, "-o", out, "-m", model_dir, "--tile-px", 256, "--halo-px", 32, "--quiet", "--cells", 4,
              "--measurements", "basic", "--parquet", "--max-features-per-file", 5)
    assert res.exit_code == 0, res.output
    parts = sorted(out.glob("good*.geojson"))
    features = [f for p in parts for f in read_geojson(p)["features"]]
    assert len(parts) == -(-len(features) // 5) >= 2
    check_qupath_geojson({"type": "FeatureCollection", "features": features}, (300, 300), cells=True)
    assert "Nucleus: Circularity" in features[0]["properties"]["measurements"]
    assert "Nucleus: Eosin OD mean" not in features[0]["properties"]["measurements"]  # basic: shape only
    df = pd.read_parquet(out / "good_nuclei.parquet")
    assert df["id"].tolist() == [f["id"] for f in features]
    res = run(slide, "-o", tmp_path / "o2", "-m", model_dir, "--cells", -2, "--quiet")
    assert res.exit_code == 1 and "--cells -2" in res.output


def test_tissue_annotation_option(tmp_path, model_05):
    import shapely

    slide = small_slide(tmp_path / "s.tif", side=512, mpp=0.5)
    res = cli_run("segment", slide, "-o", tmp_path / "out", "-m", model_05, "--tile-px", 256, "--halo-px", 32,
              "--quiet", "--tissue-annotation")
    assert res.exit_code == 0, res.output
    fc = json.loads((tmp_path / "out" / "s_tissue.geojson").read_text())
    (f,) = fc["features"]
    assert f["properties"]["objectType"] == "annotation"
    geom = shapely.geometry.shape(f["geometry"])
    assert geom.is_valid and geom.area > 0.5 * 512 * 512


def test_segment_tile_default_is_the_tiling_configs():
    """One owner for the tile size: the CLI's default is TilingConfig's (the CLI spells it out for --help)."""
    from pronet_wsi.tiling import TilingConfig

    option = next(p for p in main.commands["segment"].params if p.name == "tile_px")
    assert option.default == TilingConfig().tile_px
