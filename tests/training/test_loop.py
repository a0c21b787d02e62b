import csv

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pronet_wsi.cli import main
from pronet_wsi.errors import InputError
from pronet_wsi.model import load_model
from pronet_wsi.training import loop
from pronet_wsi.training.dataset import load_items, load_val_items
from pronet_wsi.training.loop import TrainConfig, train

NAMES = ["TCGA-A7-A13E-01Z-00-DX1", "TCGA-B0-5711-01Z-00-DX1"]


def _config(**kw):
    base = dict(epochs=2, width=0.0625, patch_px=96, patches_per_image=2, batch_size=2, lr=1e-3,
                offset_start_epoch=1, refine_start_epoch=1, val_every=1, seed=0, tune_thresholds=False)
    return TrainConfig(**{**base, **kw})


@pytest.fixture
def items(monuseg_dir):
    crop = []
    for name, image, pts in load_items(monuseg_dir / "images", labels=monuseg_dir / "labels", names=NAMES):
        keep = (pts < 300).all(1)
        crop.append((name, image[:300, :300], pts[keep]))
    return crop


@pytest.mark.data
def test_two_epochs_write_a_model_predict_loads(items, monuseg_dir, tmp_path):
    val = [(n, im[:256, :256], gt[:256, :256]) for n, im, gt in
           load_val_items(monuseg_dir / "images", monuseg_dir / "labels", ["TCGA-AR-A1AS-01Z-00-DX1"])]
    out = train(_config(), items, tmp_path / "m", val_items=val, progress=False)
    bundle = load_model(out)
    assert bundle.config.width == 0.0625
    rows = list(csv.DictReader(open(out / "train" / "log.csv")))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert all(np.isfinite(float(r["loss"])) for r in rows) and rows[-1]["val_aji"] != ""
    assert (out / "train" / "curve.png").stat().st_size > 0
    assert len(list((out / "train" / "refined_points").glob("*.csv"))) == 2
    res = CliRunner().invoke(main, ["predict", str(monuseg_dir / "images" / f"{NAMES[0]}.tif"), "-o",
                                    str(tmp_path / "pred"), "-m", str(out)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "pred" / f"{NAMES[0]}.tif").exists()


@pytest.mark.data
def test_resume_after_kill_continues_exactly(items, tmp_path, monkeypatch):
    ref = train(_config(), items, tmp_path / "ref", progress=False)
    real_save = loop._save_checkpoint

    def save_then_die(path, *args):
        real_save(path, *args)
        raise KeyboardInterrupt  # killed right after the first checkpoint

    monkeypatch.setattr(loop, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(_config(), items, tmp_path / "run", progress=False)
    monkeypatch.setattr(loop, "_save_checkpoint", real_save)
    assert torch.load(tmp_path / "run" / "train" / "checkpoint.pt", weights_only=False)["epoch"] == 0
    with pytest.raises(InputError, match="--resume"):
        train(_config(), items, tmp_path / "run", progress=False)
    train(_config(), items, tmp_path / "run", resume=True, progress=False)
    rows = list(csv.DictReader(open(tmp_path / "run" / "train" / "log.csv")))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    a = load_model(ref).model.state_dict()
    b = load_model(tmp_path / "run").model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4)


def test_train_cli_bad_input(tmp_path):
    res = CliRunner().invoke(main, ["train", "--images", str(tmp_path / "nope"), "--labels", str(tmp_path),
                                    "-o", str(tmp_path / "m")])
    assert res.exit_code != 0 and "not a folder" in res.output
    (tmp_path / "imgs").mkdir()
    res = CliRunner().invoke(main, ["train", "--images", str(tmp_path / "imgs"), "--points", str(tmp_path),
                                    "-o", str(tmp_path / "m")])
    assert res.exit_code != 0 and "no images" in res.output
    assert "Traceback" not in res.output


def test_tune_thresholds_searches_the_minimum_area():
    # one true 20x20 nucleus and a 5x5 speck the maps also call a nucleus: only a minimum area > 25 px removes it
    from types import SimpleNamespace

    from pronet_wsi.postprocess import PostprocessConfig

    gt = np.zeros((64, 64), np.int32)
    gt[10:30, 10:30] = 1
    fg = np.zeros((64, 64), np.float32)
    fg[10:30, 10:30] = 1.0
    fg[50:55, 50:55] = 1.0
    centers = np.zeros((64, 64), np.float32)
    centers[19, 19] = centers[52, 52] = 1.0
    maps = {"foreground": fg, "centers": centers, "offsets": np.zeros((2, 64, 64), np.float32)}
    predictor = SimpleNamespace(model=torch.nn.Identity(), predict_image=lambda im: maps)
    items = [("x", np.zeros((64, 64, 3), np.uint8), gt)]
    base = PostprocessConfig(grouping="nearest_center")
    assert loop.tune_thresholds(predictor, items, base).min_area_px == 10  # the old grid: cannot drop it
    tuned = loop.tune_thresholds(predictor, items, base, (10, 40))
    assert tuned.min_area_px == 40
