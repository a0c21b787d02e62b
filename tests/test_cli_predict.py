import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from PIL import Image

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
