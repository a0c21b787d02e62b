import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from wsi_fakes import cli_run, one_line_error

from pronet_wsi.cli import main
from pronet_wsi.errors import InputError
from pronet_wsi.model import ModelConfig, PRONet, load_model, resolve_model_dir, save_model
from pronet_wsi.synthetic import synthetic_nuclei
from pronet_wsi.training import loop
from pronet_wsi.training.inputs import load_items, load_val_items
from pronet_wsi.training.loop import TrainConfig, train
from pronet_wsi.training.losses import LossConfig

NAMES = ["TCGA-A7-A13E-01Z-00-DX1", "TCGA-B0-5711-01Z-00-DX1"]


def _config(**kw):
    base = dict(epochs=2, width=0.0625, patch_px=96, patches_per_image=2, batch_size=2, lr=1e-3,
                offset_start_epoch=1, refine_start_epoch=1, val_every=1, seed=0, tune_thresholds=False)
    return TrainConfig(**{**base, **kw})


@pytest.fixture
def items(monuseg_dir):
    crop = []
    for name, image, pts, *_ in load_items(monuseg_dir / "images", labels=monuseg_dir / "labels", names=NAMES):
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


@pytest.fixture
def synthetic_items():
    """Two 192 px images of synthetic nuclei with their centres as points (continuous x, y frame)."""
    out = []
    for i in range(2):
        image, _, centers_rc = synthetic_nuclei((192, 192), 14, seed=i)
        out.append((f"syn{i}", image, centers_rc[:, ::-1].astype(np.float64) + 0.5))
    return out


@pytest.mark.data
def test_resume_after_kill_continues_exactly(items, tmp_path, monkeypatch):
    _check_exact_resume(items, tmp_path, monkeypatch)


def test_resume_after_kill_continues_exactly_on_synthetic_nuclei(synthetic_items, tmp_path, monkeypatch):
    _check_exact_resume(synthetic_items, tmp_path, monkeypatch)


def test_first_epochs_run_without_offsets_and_refinement(synthetic_items, tmp_path, monkeypatch):
    """Epochs before offset_start_epoch train binary + centre only and predict nothing; offsets come next, the
    E-step only from refine_start_epoch (paper: 20 and 30 of 150)."""
    calls = []
    real_predict, real_m_step = loop.predict_and_refine, loop.m_step_epoch

    def predict_spy(predictor, samples, refine):
        calls.append(("predict", refine is not None))
        return real_predict(predictor, samples, refine)

    def m_step_spy(predictor, opt, loader, loss, use_offsets, *rest):
        calls.append(("m_step", use_offsets))
        return real_m_step(predictor, opt, loader, loss, use_offsets, *rest)

    monkeypatch.setattr(loop, "predict_and_refine", predict_spy)
    monkeypatch.setattr(loop, "m_step_epoch", m_step_spy)
    out = train(_config(epochs=3, offset_start_epoch=1, refine_start_epoch=2), synthetic_items, tmp_path / "m",
                progress=False)
    assert calls == [("m_step", False),  # epoch 0: no prediction, no offset loss
                     ("predict", False), ("m_step", True),  # epoch 1: offset targets, no E-step
                     ("predict", True), ("m_step", True)]  # epoch 2: E-step
    rows = list(csv.DictReader(open(out / "train" / "log.csv")))
    assert rows[0]["mean_movement"] == rows[1]["mean_movement"] == "nan" and rows[2]["mean_movement"] != "nan"


def _check_exact_resume(items, tmp_path, monkeypatch):
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
    assert (tuned.center_threshold, tuned.foreground_threshold) == (0.1, 0.4)  # ties keep the first of the grid
    grid = loop.tune_thresholds(predictor, items, base, (40,), (0.35, 0.1), (0.55,))
    assert (grid.center_threshold, grid.foreground_threshold) == (0.35, 0.55)


def test_the_threshold_grid_is_a_config_value_that_round_trips():
    cfg = loop.TrainConfig(tune_center_thresholds=(0.25,), tune_foreground_thresholds=(0.5, 0.7))
    back = loop.TrainConfig.from_json(json.loads(json.dumps(cfg.to_json())))
    assert back == cfg and back.tune_center_thresholds == (0.25,)
    assert loop.TrainConfig().tune_center_thresholds == (0.1, 0.2, 0.3, 0.4)
    old = cfg.to_json()
    del old["holdout_min_clicks"]  # a run written before the minimum resumes with the split it drew
    assert loop.TrainConfig.from_json(json.loads(json.dumps(old))).holdout_min_clicks == 0


# -- recipes and --init (no shared data needed) -------------------------------------------------------------------
def test_recipe_defaults_are_the_dataclass_defaults(tmp_path, monkeypatch):
    from pronet_wsi.training.loop import FINE_TUNE

    assert TrainConfig.recipe() == TrainConfig()
    assert TrainConfig().width == 0.25 and TrainConfig().offset_start_epoch == 16
    paper = TrainConfig.recipe("paper")
    assert (paper.width, paper.lr, paper.epochs, paper.refine_start_epoch) == (1.0, 1e-4, 150, 30)
    tuned = TrainConfig.recipe(init="default", lr=None)
    assert tuned.lr == FINE_TUNE["lr"] and tuned.offset_start_epoch == 0 and tuned.init == "default"
    assert TrainConfig(use_offsets=False).grouping == "nearest_center"
    seen = {}

    def fake_train(config, items, outdir, **kw):
        seen["config"] = config
        return outdir

    monkeypatch.setattr(loop, "train", fake_train)

    from pronet_wsi.synthetic import synthetic_nuclei
    from pronet_wsi.training.points import write_points_csv

    img, _, centers = synthetic_nuclei((64, 64), 4)
    Image.fromarray(img).save(tmp_path / "a.png")
    write_points_csv(tmp_path / "a.csv", centers[:, ::-1])
    res = CliRunner().invoke(main, ["train", "--images", tmp_path, "--points", tmp_path, "-o", tmp_path / "m"])
    assert res.exit_code == 0, res.output
    assert seen["config"] == TrainConfig()
    res = CliRunner().invoke(main, ["train", "--images", tmp_path, "--points", tmp_path, "-o", tmp_path / "m",
                                    "--recipe", "paper", "--epochs", "7"])
    assert seen["config"] == TrainConfig.recipe("paper", epochs=7)


def _synthetic_items(n: int, seed: int, colour_shift: int = 0):
    from pronet_wsi.synthetic import synthetic_nuclei

    items = []
    for i in range(n):
        img, _, centers = synthetic_nuclei((128, 128), 14, seed=seed + i)
        img = np.clip(img.astype(int) + colour_shift, 0, 255).astype(np.uint8)
        items.append((f"s{seed + i}", img, centers[:, ::-1].astype(float)))
    return items


def test_init_round_trip_keeps_mpp_and_normalisation(tmp_path):
    base = TrainConfig(epochs=2, width=0.0625, patch_px=96, patches_per_image=40, batch_size=2, val_every=9,
                       tune_thresholds=False, num_threads=1)
    first = train(base, _synthetic_items(2, 0), tmp_path / "a", progress=False)
    a = load_model(first)
    tuned_cfg = TrainConfig.recipe(init=str(first), epochs=3, width=0.0625, patch_px=96, patches_per_image=40,
                                   batch_size=2, tune_thresholds=False, num_threads=1)
    second = train(tuned_cfg, _synthetic_items(2, 10, colour_shift=25), tmp_path / "b", progress=False)
    b = load_model(second)
    assert b.config.mean == a.config.mean and b.config.std == a.config.std and b.config.mpp == a.config.mpp
    assert b.config.width == a.config.width
    wa, wb = a.model.state_dict(), b.model.state_dict()
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)
    rows = list(csv.DictReader(open(second / "train" / "log.csv")))
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])  # a short fine-tune on new data lowers the loss
    with pytest.raises(InputError, match="width"):
        train(TrainConfig.recipe(init=str(first), width=0.25, epochs=1), _synthetic_items(1, 20), tmp_path / "d",
              progress=False)


def test_init_from_a_stride_2_model_fine_tunes_the_same_network(tmp_path):
    """A start model with the stride-2 stem (the fast architecture) is fine-tuned as it is: the stem, the
    refinement and every weight carry over, and the trained model still has them."""
    torch.manual_seed(0)
    start = PRONet(ModelConfig(width=0.0625, stem_stride=2))
    save_model(start, tmp_path / "start")
    cfg = TrainConfig.recipe(init=str(tmp_path / "start"), epochs=2, patch_px=96, patches_per_image=20,
                             batch_size=2, tune_thresholds=False, num_threads=1)
    tuned = load_model(train(cfg, _synthetic_items(2, 0), tmp_path / "m", progress=False))
    assert tuned.config.stem_stride == 2 and tuned.model.stride == 32
    assert tuned.model.state_dict().keys() == start.state_dict().keys()
    assert not torch.equal(tuned.model.refine[0].weight, start.refine[0].weight)


def test_init_at_another_mpp_rescales_lengths_in_pixels():
    start = load_model(resolve_model_dir(None))
    half = loop.rescale_model(start, 2 * start.config.mpp)
    assert half.config.mpp == 2 * start.config.mpp and half.config.context_px == start.config.context_px
    assert half.config.center_radius_px == start.config.center_radius_px / 2  # same radius in um
    assert half.config.offset_scale == start.config.offset_scale / 2
    assert half.thresholds.min_area_px == round(start.thresholds.min_area_px / 4)
    assert loop.rescale_model(start, start.config.mpp) is start


def test_the_best_validated_epoch_is_kept(tmp_path, monkeypatch):
    """Validation AJI 0.5 after epoch 0 and 0.3 after epoch 1: the saved weights are epoch 0's."""
    from pronet_wsi.metrics import ImageScores

    scores = iter([0.5, 0.3])

    def fake_validate(predictor, val_items, thresholds):
        aji = next(scores)
        return ImageScores(object_dice=aji, pixel_dice=aji, aji=aji, pq=aji, dq=aji, sq=aji, n_gt=1, n_pred=1)

    monkeypatch.setattr(loop, "validate", fake_validate)
    items = _synthetic_items(2, 0)
    val = [(n, im, np.zeros(im.shape[:2], np.uint32)) for n, im, _ in items]
    cfg = TrainConfig(epochs=2, width=0.0625, patch_px=96, patches_per_image=200, batch_size=2, val_every=1,
                      tune_thresholds=False, num_threads=1)
    out = train(cfg, items, tmp_path / "m", val_items=val, progress=False)
    best = torch.load(out / "train" / "best.pt", weights_only=True)
    assert int(best["epoch"]) == 0
    saved = load_model(out).model.state_dict()
    last = loop.load_checkpoint(out / "train" / "checkpoint.pt")["model"]
    assert all(torch.equal(saved[k], best["model"][k]) for k in saved)
    assert any(not torch.equal(saved[k], last[k]) for k in saved)

    assert json.loads((out / "config.json").read_text())["extra"]["kept_epoch"] == 0


def test_one_owner_for_the_radius_mpp_and_width_of_an_init_run():
    from pronet_wsi.model import resolve_model_dir

    assert TrainConfig().radius_px == ModelConfig().center_radius_px
    start = load_model(resolve_model_dir(None)).config
    tuned = TrainConfig.recipe("cpu", init="default")
    assert (tuned.mpp, tuned.width, tuned.radius_px) == (start.mpp, start.width, start.center_radius_px)
    half = TrainConfig.recipe("cpu", init="default", mpp=2 * start.mpp)  # another mpp: the start model rescaled
    assert (half.mpp, half.radius_px) == (2 * start.mpp, start.center_radius_px / 2)
    with pytest.raises(InputError, match="drop --width"):
        TrainConfig.recipe("cpu", init="default", width=1.0)


def test_the_readme_states_the_fine_tune_settings():

    from pronet_wsi.training.loop import FINE_TUNE

    text = " ".join((Path(__file__).parents[2] / "README.md").read_text().split())
    import re

    assert float(re.search(r"settings: lr (\S+) without warm-up", text).group(1)) == FINE_TUNE["lr"]
    assert f"{FINE_TUNE['epochs']} epochs of {FINE_TUNE['patches_per_image']} patches per megapixel" in text
    assert f"every {FINE_TUNE['predict_every']}rd epoch, validation every {FINE_TUNE['val_every']}rd epoch" in text
    from pronet_wsi.training.loop import MANY_TYPED_CLICKS, type_lr_factor_for

    assert FINE_TUNE["type_lr_factor"] is None  # by the click count:
    assert (f"learning rate {type_lr_factor_for(MANY_TYPED_CLICKS):g}x from {MANY_TYPED_CLICKS:,} classed clicks on, "
            f"{type_lr_factor_for(MANY_TYPED_CLICKS - 1):g}x below") in text
    assert FINE_TUNE["offset_start_epoch"] == FINE_TUNE["refine_start_epoch"] == 0  # "from the first epoch"
    from pronet_wsi.training.loop import KEEP_FEW_CLICKS, keep_weight_for

    assert FINE_TUNE["loss"].lambda_keep is None and keep_weight_for(MANY_TYPED_CLICKS) == 0  # by the click count:
    assert (f"From fewer than {MANY_TYPED_CLICKS:,} clicks" in text
            and f"frozen copy of it; weight {KEEP_FEW_CLICKS:g}," in text)


def test_the_type_head_rate_follows_the_number_of_classed_clicks():
    from pronet_wsi.training.loop import MANY_TYPED_CLICKS, with_point_classes

    def items(n):
        return [("a", None, np.zeros((n, 2)), None, ["T" if i % 2 else "S" for i in range(n)])]

    few = with_point_classes(TrainConfig(type_lr_factor=None), items(MANY_TYPED_CLICKS - 1))
    many = with_point_classes(TrainConfig(type_lr_factor=None), items(MANY_TYPED_CLICKS))
    assert few.classes == many.classes == ("S", "T")
    assert (few.type_lr_factor, many.type_lr_factor) == (1.0, 5.0)
    assert with_point_classes(TrainConfig(type_lr_factor=2.0), items(10)).type_lr_factor == 2.0  # given: kept


def test_the_keep_term_follows_the_number_of_classed_clicks():
    from pronet_wsi.training.loop import FINE_TUNE, KEEP_FEW_CLICKS, MANY_TYPED_CLICKS, with_point_classes

    def items(n, classed=True):
        return [("a", None, np.zeros((n, 2)), None, ["T" if i % 2 else "S" for i in range(n)] if classed else None)]

    auto = FINE_TUNE["loss"]
    assert auto.lambda_keep is None
    few = with_point_classes(TrainConfig(loss=auto), items(MANY_TYPED_CLICKS - 1))
    many = with_point_classes(TrainConfig(loss=auto), items(MANY_TYPED_CLICKS))
    untyped = [with_point_classes(TrainConfig(loss=auto), items(n, classed=False))
               for n in (MANY_TYPED_CLICKS - 1, MANY_TYPED_CLICKS)]
    assert (few.loss.lambda_keep, many.loss.lambda_keep) == (KEEP_FEW_CLICKS, 0.0)
    assert [u.loss.lambda_keep for u in untyped] == [KEEP_FEW_CLICKS, 0.0]  # untyped: all clicks count
    given = TrainConfig(loss=LossConfig(lambda_keep=0.5))
    assert with_point_classes(given, items(10)).loss.lambda_keep == 0.5  # given: kept
    assert TrainConfig.from_json(few.to_json()).loss.lambda_keep == KEEP_FEW_CLICKS  # a resumed run keeps it


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated"])
def test_bad_checkpoint_is_one_line_error(tmp_path, image_png, content):
    mdir = tmp_path / "run"
    (mdir / "train").mkdir(parents=True)
    (mdir / "train" / "checkpoint.pt").write_bytes(content)
    line = one_line_error(cli_run("train", "--images", image_png.parent, "--labels", image_png.parent, "-o", mdir,
                              "--resume", "--quiet"))
    assert "checkpoint" in line
