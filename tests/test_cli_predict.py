import numpy as np
import pytest
import tifffile
import torch
from click.testing import CliRunner
from PIL import Image
from wsi_fakes import cli_run, one_line_error

from pronet_wsi.cli import main
from pronet_wsi.model import ModelConfig, PRONet, save_model
from pronet_wsi.synthetic import synthetic_nuclei


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    save_model(PRONet(ModelConfig(width=0.0625)), d)
    return d


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    img, _, _ = synthetic_nuclei((120, 140), 10)
    Image.fromarray(img).save(d / "a.png")
    rgba = np.dstack([img, np.full(img.shape[:2], 255, np.uint8)])
    Image.fromarray(rgba).save(d / "b_rgba.png")
    tifffile.imwrite(d / "c16.tif", img.astype(np.uint16) * 257)
    return d


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_predict_folder_writes_maps_and_overlays(image_dir, model_dir, tmp_path):
    res = run("predict", image_dir, "-o", tmp_path / "out", "-m", model_dir)
    assert res.exit_code == 0, res.output
    for stem in ("a", "b_rgba", "c16"):
        lab = tifffile.imread(tmp_path / "out" / f"{stem}.tif")
        assert lab.dtype == np.uint32 and lab.shape == (120, 140)
        assert np.asarray(Image.open(tmp_path / "out" / f"{stem}_overlay.png")).shape == (120, 140, 3)


@pytest.mark.parametrize("case", ["missing", "not_image", "empty_dir", "grayscale"])
def test_predict_bad_input_one_line_no_output(case, tmp_path, model_dir):
    src = tmp_path / "src"
    src.mkdir()
    target = {"missing": src / "nope.png", "empty_dir": src}.get(case)
    if case == "not_image":
        target = src / "notes.png"
        target.write_text("this is not an image")
    if case == "grayscale":
        target = src / "gray.png"
        Image.fromarray(np.zeros((50, 50), np.uint8)).save(target)
    res = run("predict", target, "-o", tmp_path / "out", "-m", model_dir)
    assert res.exit_code != 0
    assert res.output.startswith("Error:") and len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_predict_without_model_or_bad_model(image_dir, tmp_path, monkeypatch):
    import pronet_wsi.model as model_mod

    monkeypatch.setattr(model_mod, "default_model_dir", lambda: None)
    res = run("predict", image_dir / "a.png", "-o", tmp_path / "out")
    assert res.exit_code != 0 and "no default model" in res.output
    res = run("predict", image_dir / "a.png", "-o", tmp_path / "out", "-m", tmp_path)
    assert res.exit_code != 0 and "not a model folder" in res.output


def test_info_runs(model_dir):
    res = run("info")
    assert res.exit_code == 0 and "torch" in res.output and "device:" in res.output


def _calling_model(path, classes: tuple[str, ...] = ()):
    """A tiny random model at 0.5 um/px whose head biases make it call some nuclei."""

    torch.manual_seed(0)
    net = PRONet(ModelConfig(width=0.0625, mpp=0.5, classes=classes))
    with torch.no_grad():
        net.head_center.bias.fill_(-0.5)
        net.head_binary.bias.fill_(0.5)
    return save_model(net.eval(), path)


@pytest.mark.parametrize("typed", [False, True])
def test_predict_writes_a_table_of_nuclei_matching_the_label_map(tmp_path, typed):
    import csv

    _calling_model(tmp_path / "m", ("Tumor", "Stroma") if typed else ())
    img, _, _ = synthetic_nuclei((96, 96), 8)
    Image.fromarray(img).save(tmp_path / "a.png")
    res = run("predict", tmp_path / "a.png", "-o", tmp_path / "out", "-m", tmp_path / "m", "--mpp", 0.25)
    assert res.exit_code == 0, res.output
    lab = tifffile.imread(tmp_path / "out" / "a.tif")
    rows = list(csv.DictReader((tmp_path / "out" / "a_nuclei.csv").open()))
    assert len(rows) == lab.max() > 0
    assert list(rows[0]) == ["id", "x", "y", "class", "class_probability", "area_um2"]
    for r in rows:
        i = int(r["id"])
        assert float(r["area_um2"]) == pytest.approx((lab == i).sum() * 0.25**2, rel=1e-3)  # input pixels
        assert 0 <= float(r["x"]) <= 96 and 0 <= float(r["y"]) <= 96
        if typed:
            assert r["class"] in ("Tumor", "Stroma") and 0.5 <= float(r["class_probability"]) <= 1.0
        else:
            assert r["class"] == "Nucleus" and r["class_probability"] == ""


def test_predict_beyond_edge_white_reads_glass_beyond_the_image(tmp_path, monkeypatch):
    """``--beyond-edge white`` makes the tiles read white beyond the image's edge (what ``segment`` reads beyond a
    slide); the default reads the image's mirror."""
    import pronet_wsi.inference as inference

    seen: list[np.ndarray] = []
    read = inference.read_tile
    monkeypatch.setattr(inference, "read_tile", lambda im, box, edge="mirror": seen.append(read(im, box, edge))
                        or seen[-1])
    _calling_model(tmp_path / "m")
    img, _, _ = synthetic_nuclei((96, 96), 8)
    Image.fromarray(img).save(tmp_path / "a.png")
    for edge in ("mirror", "white"):
        res = run("predict", tmp_path / "a.png", "-o", tmp_path / edge, "-m", tmp_path / "m", "--beyond-edge", edge)
        assert res.exit_code == 0, res.output
    mirror, white = seen  # one tile each: the 96 px image and the model's context around it
    assert white.shape == mirror.shape and white.shape[0] > 96
    assert (white == 255).all(-1).mean() > 0.5 and (mirror == 255).all(-1).mean() < 0.1


def test_predict_cells_writes_a_cell_label_map(tmp_path):
    import csv

    _calling_model(tmp_path / "m")
    img, _, _ = synthetic_nuclei((96, 96), 8)
    Image.fromarray(img).save(tmp_path / "a.png")
    res = run("predict", tmp_path / "a.png", "-o", tmp_path / "out", "-m", tmp_path / "m", "--cells", 1.0)
    assert res.exit_code == 0, res.output
    lab = tifffile.imread(tmp_path / "out" / "a.tif")
    cells = tifffile.imread(tmp_path / "out" / "a_cells.tif")
    assert (cells[lab > 0] == lab[lab > 0]).all() and (cells > 0).sum() >= (lab > 0).sum()
    rows = list(csv.DictReader((tmp_path / "out" / "a_nuclei.csv").open()))
    assert rows and all(float(r["cell_area_um2"]) >= float(r["area_um2"]) for r in rows)
    assert run("predict", tmp_path / "a.png", "-o", tmp_path / "o2", "-m", tmp_path / "m", "--cells", -1).exit_code == 1


def test_predict_refuses_to_overwrite_input(tmp_path, model_05):
    img, _, _ = synthetic_nuclei((64, 64), 4)
    tifffile.imwrite(tmp_path / "a.tif", img)
    before = (tmp_path / "a.tif").read_bytes()
    Image.fromarray(img).save(tmp_path / "b.png")
    line = one_line_error(cli_run("predict", tmp_path / "a.tif", "-o", tmp_path, "-m", model_05))
    assert "would overwrite the input" in line
    assert (tmp_path / "a.tif").read_bytes() == before
    Image.fromarray(img).save(tmp_path / "a.png")
    line = one_line_error(cli_run("predict", tmp_path / "a.tif", tmp_path / "a.png", "-o", tmp_path / "o",
                              "-m", model_05))
    assert "both write" in line and not (tmp_path / "o").exists()
