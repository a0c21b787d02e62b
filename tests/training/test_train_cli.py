import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from wsi_fakes import cli_run, one_line_error

from pronet_wsi.cli import main
from pronet_wsi.model import load_model
from pronet_wsi.synthetic import synthetic_nuclei
from pronet_wsi.training.points import write_points_csv, write_points_geojson

TINY = ["--width", "0.0625", "--epochs", "1", "--patch-px", "96", "--patches-per-image", "2", "--batch-size", "2",
        "--quiet"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.data
def test_train_from_qupath_points_on_a_slide(slides_dir, tmp_path):
    rng = np.random.default_rng(0)
    pts = np.column_stack([rng.uniform(1000, 1300, 30), rng.uniform(1200, 1500, 30)])
    write_points_geojson(tmp_path / "points.geojson", pts)
    slide = slides_dir / "CMU-1-Small-Region.svs"
    res = run("train", "--slide", slide, "--points", tmp_path / "points.geojson", *TINY, "-o", tmp_path / "m0")
    assert res.exit_code != 0 and "no region annotations" in res.output and "Traceback" not in res.output
    fc = json.loads((tmp_path / "points.geojson").read_text())  # a QuPath rectangle exported with the points
    fc["features"].append({"type": "Feature", "properties": {"objectType": "annotation"}, "geometry": {
        "type": "Polygon", "coordinates": [[[990, 1190], [1310, 1190], [1310, 1510], [990, 1510], [990, 1190]]]}})
    (tmp_path / "points.geojson").write_text(json.dumps(fc))
    res = run("train", "--slide", slide, "--points", tmp_path / "points.geojson", *TINY, "-o", tmp_path / "m")
    assert res.exit_code == 0, res.output
    bundle = load_model(tmp_path / "m")
    assert bundle.config.mpp == 0.25
    (tmp_path / "slides.csv").write_text(f"slide,points\n{slide},points.geojson\n")
    res = run("train", "--slide-list", tmp_path / "slides.csv", *TINY, "-o", tmp_path / "m2")
    assert res.exit_code == 0, res.output


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "pts").mkdir()
    for i in range(2):
        img, _, centers = synthetic_nuclei((128, 128), 12, seed=i)
        Image.fromarray(img).save(tmp_path / "imgs" / f"im{i}.png")
        write_points_csv(tmp_path / "pts" / f"im{i}.csv", centers[:, ::-1])
    return tmp_path


def test_train_from_image_folder_and_point_csvs(folder):
    res = run("train", "--images", folder / "imgs", "--points", folder / "pts", *TINY, "-o", folder / "m")
    assert res.exit_code == 0, res.output
    assert (folder / "m" / "weights.pt").exists()


def test_image_without_points_is_skipped_and_outside_points_are_an_error(folder):
    (folder / "pts" / "im1.csv").unlink()  # issue 17: an error naming it, or skipped with --drop-unmatched
    res = run("train", "--images", folder / "imgs", "--points", folder / "pts", *TINY, "-o", folder / "m1")
    assert res.exit_code != 0 and "im1.png" in res.output and "--drop-unmatched" in res.output
    res = run("train", "--images", folder / "imgs", "--points", folder / "pts", *TINY, "-o", folder / "m1",
              "--drop-unmatched")
    assert res.exit_code == 0, res.output
    write_points_csv(folder / "pts" / "im0.csv", np.array([[10.0, 10.0], [500.0, 20.0]]))
    res = run("train", "--images", folder / "imgs", "--points", folder / "pts", *TINY, "-o", folder / "m2",
              "--drop-unmatched")
    assert res.exit_code != 0 and "outside" in res.output and "Traceback" not in res.output
    (folder / "pts" / "im0.csv").write_text("x,y\n1,2\nthree,4\n")
    res = run("train", "--images", folder / "imgs", "--points", folder / "pts", *TINY, "-o", folder / "m3",
              "--drop-unmatched")
    assert res.exit_code != 0 and "im0.csv:3: bad row" in res.output


def test_old_slide_mpp_names_the_new_option(folder):
    res = run("train", "--slide", folder / "s.svs", "--points", folder / "p.geojson", "--slide-mpp", "0.5",
              "-o", folder / "m")
    assert res.exit_code == 2 and "--slide-mpp is now --mpp" in res.output and "--model-mpp" in res.output
    assert "Traceback" not in res.output


def test_resume_refuses_the_options_it_would_ignore(folder):
    res = run("train", "--images", folder / "imgs", "--points", folder / "pts", *TINY, "-o", folder / "m")
    assert res.exit_code == 0, res.output
    res = run("train", "--images", folder / "imgs", "--points", folder / "pts", "--resume", "--lr", "1e-4",
              "--width", "0.125", "--batch-size", "2", "--keep-start", "1", "-o", folder / "m")
    assert res.exit_code == 2 and "would ignore --width, --lr, --keep-start;" in res.output
    assert "--epochs" in res.output
    before = (folder / "m" / "weights.pt").read_bytes()
    res = run("train", "--images", folder / "imgs", "--points", folder / "pts", "--resume", *TINY[:-3],  # as before
              "--epochs", "2", "--quiet", "-o", folder / "m")
    assert res.exit_code == 0, res.output
    assert (folder / "m" / "weights.pt").read_bytes() != before  # one more epoch trained


def test_train_help_explains_each_default():
    text = CliRunner().invoke(main, ["train", "--help"], terminal_width=200).output
    assert "[recipe]" not in text and "[0]" not in text
    assert "cpu 120, paper 150; with --init 40" in text  # --epochs, from RECIPES and FINE_TUNE
    assert "cpu 0.001, paper 0.0001; with --init 0.0005" in text  # --lr
    assert "--slide-mpp" not in text


def test_shift_without_seed_uses_the_run_seed(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "labels").mkdir()
    image, labels, _ = synthetic_nuclei((128, 128), 12, seed=0)
    Image.fromarray(image).save(tmp_path / "imgs" / "a.png")
    Image.fromarray(labels.astype(np.uint16)).save(tmp_path / "labels" / "a.png")
    res = run("train", "--images", tmp_path / "imgs", "--labels", tmp_path / "labels", "--shift", "1", "2", *TINY,
              "-o", tmp_path / "m")
    assert res.exit_code == 0, res.output  # was a TypeError (None + int) without --seed


def test_train_points_outside_suggests_a_real_option(tmp_path):
    img, _, _ = synthetic_nuclei((64, 64), 4)
    Image.fromarray(img).save(tmp_path / "a.png")
    (tmp_path / "a.csv").write_text("x,y\n10,10\n30,30\n500,20\n")
    line = one_line_error(cli_run("train", "--images", tmp_path, "--points", tmp_path, "-o", tmp_path / "m",
                              "--epochs", 1, "--quiet"))
    assert "--drop-outside" in line and "a.csv" in line
    res = CliRunner().invoke(main, ["train", "--help"])
    assert "--drop-outside" in res.output
