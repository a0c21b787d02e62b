"""Nucleus types from classed clicks: points with classes, the type head, its targets, loss and training."""

from __future__ import annotations

import csv
import gzip
import json
import logging
from dataclasses import replace

import numpy as np
import pytest
import torch

from pronet_wsi.errors import InputError
from pronet_wsi.inference import Predictor, segment_image
from pronet_wsi.model import ModelConfig, PRONet, class_colors, load_model, save_model
from pronet_wsi.postprocess import PostprocessConfig, reweight_classes
from pronet_wsi.synthetic import synthetic_typed_nuclei
from pronet_wsi.training.dataset import type_target
from pronet_wsi.training.inputs import item_classes, load_items, resample_items
from pronet_wsi.training.loop import TrainConfig, start_model, train
from pronet_wsi.training.losses import LossConfig, type_ce
from pronet_wsi.training.points import centroids_from_labels, read_points_classes, read_regions, write_points_csv


def _qupath_export(with_gzip: bool, path) -> None:
    """A file in the form QuPath 0.5/0.6 writes: classed Points annotations, a rectangle, pronet-wsi's Tissue
    annotation and a detection, in one FeatureCollection."""
    features = [
        {"type": "Feature", "id": "a1", "geometry": {"type": "MultiPoint", "coordinates": [[10.5, 20.5], [30, 40]]},
         "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}}},
        {"type": "Feature", "id": "a2", "geometry": {"type": "MultiPoint", "coordinates": [[50, 60]]},
         "properties": {"objectType": "annotation",
                        "classification": {"name": "Immune cells", "color": [160, 90, 160]}}},
        {"type": "Feature", "id": "a3", "geometry": {"type": "MultiPoint", "coordinates": [[70, 80]]},
         "properties": {"objectType": "annotation"}},  # unclassified points: untyped clicks
        {"type": "Feature", "id": "r1", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [100, 0], [100, 100],
                                                                                       [0, 100], [0, 0]]]},
         "properties": {"objectType": "annotation", "name": "box"}},
        {"type": "Feature", "id": "t1", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [900, 0], [900, 900],
                                                                                       [0, 900], [0, 0]]]},
         "properties": {"objectType": "annotation", "classification": {"name": "Tissue", "color": [0, 160, 0]}}},
        {"type": "Feature", "id": "d1", "geometry": {"type": "Polygon", "coordinates": [[[5, 5], [9, 5], [9, 9],
                                                                                       [5, 5]]]},
         "properties": {"objectType": "detection", "classification": {"name": "Nucleus"}}},
    ]
    text = json.dumps({"type": "FeatureCollection", "features": features})
    if with_gzip:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text)


@pytest.mark.parametrize("name", ["points.geojson", "points.geojson.gz"])
def test_qupath_export_reads_back_with_classes_and_regions(tmp_path, caplog, name):
    path = tmp_path / name
    _qupath_export(name.endswith(".gz"), path)
    with caplog.at_level(logging.WARNING):
        pts, classes = read_points_classes(path)
        regions = read_regions(path)
    np.testing.assert_array_equal(pts, [[10.5, 20.5], [30, 40], [50, 60], [70, 80]])
    assert classes == ["Tumor", "Tumor", "Immune cells", ""]
    assert [r.name for r in regions] == ["feature 3 (box)"]  # the Tissue outline is not a complete region
    assert "skipped 1 detection" in caplog.text and "Tissue annotation" in caplog.text


def test_csv_class_column_round_trips_and_nucleus_means_untyped(tmp_path):
    path = tmp_path / "p.csv"
    pts = np.array([[1.25, 2.5], [3.0, 4.0], [5.0, 6.0]])
    write_points_csv(path, pts, ["Tumor", "", "Stroma, loose"])
    got, classes = read_points_classes(path)
    np.testing.assert_array_equal(got, pts)
    assert classes == ["Tumor", "", "Stroma, loose"]
    path.write_text("x,y,class\n1,2,Nucleus\n3,4,Tumor\n5,6\n")
    assert read_points_classes(path)[1] == ["", "Tumor", ""]


def test_item_classes_are_sorted_names_without_untyped():
    items = [("a", None, None, None, ["B", "", "A"]), ("b", None, None, None, ["C"]), ("c", None, None)]
    assert item_classes(items) == ("A", "B", "C")


def test_resample_items_scales_points_in_the_continuous_frame():
    img = np.zeros((100, 60, 3), np.uint8)
    out = resample_items([("a", img, np.array([[30.0, 50.0]]), None, ["T"])], 2.0)
    name, work, pts, region, classes = out[0]
    assert work.shape == (200, 120, 3) and classes == ["T"] and region is None
    np.testing.assert_allclose(pts, [[60.0, 100.0]])


def test_type_target_covers_typed_cells_only():
    cells = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, -1, -1]])
    cluster = np.array([[1, 0, 1, 1], [1, 2, 0, 1], [1, 1, 1, 1]], np.uint8)
    voronoi = np.full(cells.shape, 2, np.uint8)
    pred = np.zeros(cells.shape, bool)
    pred[1, 1] = True  # a pale pixel k-means missed, but the model's mask has
    t = type_target(cells, cluster, voronoi, pred, np.array([1, 0, -1], np.int16))
    np.testing.assert_array_equal(t, [[1, -2, 0, 0], [1, 1, -2, 0], [-1, -1, -1, -1]])  # -2: k-means background
    outside = np.ones(cells.shape, bool)
    outside[0, 1] = False  # beyond the annotated region nothing is known to be background
    t = type_target(cells, cluster, voronoi, pred, np.array([1, 0, -1], np.int16), outside)
    assert t[0, 1] == -1 and t[1, 2] == -2


def test_type_ce_ignores_untyped_pixels_and_is_zero_without_any():
    logits = torch.tensor([[[[5.0, 0.0]], [[0.0, 5.0]]]])  # (1, 2, 1, 2)
    good = type_ce(logits, torch.tensor([[[0, -1]]]))
    bad = type_ce(logits, torch.tensor([[[1, -1]]]))
    assert float(good) < 0.01 < 4.0 < float(bad)
    assert float(type_ce(logits, torch.full((1, 1, 2), -1))) == 0.0
    assert float(type_ce(logits, torch.tensor([[[0, -2]]]))) == float(good)  # background ignored by default


def test_type_ce_background_term_teaches_no_class():
    target = torch.tensor([[[0, -2]]])
    low = torch.tensor([[[[5.0, -5.0]], [[-5.0, -5.0]]]])  # pixel 2: every class logit below the fixed 0
    high = torch.tensor([[[[5.0, 5.0]], [[-5.0, 0.0]]]])  # pixel 2 looks like class 0
    assert float(type_ce(low, target, background=1.0)) < 0.05 < 4.0 < float(type_ce(high, target, background=1.0))
    assert float(type_ce(high, target, background=1.0)) > float(type_ce(high, target, background=0.5))
    assert float(type_ce(high, target)) == float(type_ce(low, target))  # weight 0: -2 ignored


def test_typed_model_maps_and_folder_round_trip(tmp_path):
    cfg = ModelConfig(width=0.0625, classes=("Tumor", "Lymphocyte"))
    assert cfg.class_colors == ((200, 0, 0), class_colors(("Lymphocyte",))[0])  # QuPath's own Tumor colour
    net = PRONet(cfg).eval()
    with torch.no_grad():
        out = net(torch.zeros(1, 3, 40, 36))
    assert out["types"].shape == (1, 2, 40, 36)
    save_model(net, tmp_path / "m")
    bundle = load_model(tmp_path / "m")
    assert bundle.config.classes == ("Tumor", "Lymphocyte") and bundle.config.class_colors == cfg.class_colors
    maps = Predictor(bundle).predict_batch(np.zeros((1, 32, 32, 3), np.uint8))
    np.testing.assert_allclose(maps["types"].sum(axis=1), 1.0, atol=1e-4)
    with pytest.raises(ValueError, match="unique"):
        ModelConfig(classes=("A", "A"))


def test_init_from_untyped_adds_a_head_and_other_classes_start_a_new_one(tmp_path, caplog):
    untyped = save_model(PRONet(ModelConfig(width=0.0625)), tmp_path / "u")
    typed = start_model(TrainConfig(init=str(untyped), width=0.0625, classes=("A", "B")), [])
    assert typed.model.head_type is not None and typed.config.classes == ("A", "B")
    trunk = {k: v for k, v in typed.model.state_dict().items() if not k.startswith("head_type.")}
    for k, v in load_model(untyped).model.state_dict().items():
        assert torch.equal(trunk[k], v)  # the trunk is the start model's
    from pronet_wsi.classify import feature_names, fit_classifier

    x = np.random.default_rng(0).normal(size=(20, len(feature_names(("A", "B")))))
    clf = fit_classifier(x, (x[:, 0] > 0).astype(int), ("A", "B"), 0.25)
    save_model(typed.model, tmp_path / "t", PostprocessConfig(class_weights=(2.0, 1.0), nucleus_classifier=clf))
    same = start_model(TrainConfig(init=str(tmp_path / "t"), width=0.0625, classes=("A", "B")), [])
    assert torch.equal(same.model.head_type[0].weight, typed.model.head_type[0].weight)
    # the classifier was fitted to the start model's head: dropped (and refitted when the run ends)
    assert same.thresholds.class_weights == (2.0, 1.0) and same.thresholds.nucleus_classifier is None
    with caplog.at_level(logging.WARNING):
        other = start_model(TrainConfig(init=str(tmp_path / "t"), width=0.0625, classes=("A", "C")), [])
    assert other.config.classes == ("A", "C") and "new type head" in caplog.text
    assert other.thresholds.class_weights == ()  # weights of the old classes would not fit the new ones
    # a deep head where one is new; a start model with the same classes keeps its own head and weights
    deep = start_model(TrainConfig(init=str(untyped), width=0.0625, classes=("A", "B"), type_head="deep"), [])
    assert deep.config.type_head == "deep" and len(deep.model.head_type) > len(typed.model.head_type)
    kept = start_model(TrainConfig(init=str(tmp_path / "t"), width=0.0625, classes=("A", "B"), type_head="deep"), [])
    assert kept.config.type_head == "small" and torch.equal(kept.model.head_type[0].weight,
                                                             typed.model.head_type[0].weight)


def _typed_items(n: int, side: int = 192) -> list[tuple]:
    items = []
    for s in range(n):
        img, lab, _, types = synthetic_typed_nuclei((side, side), 30, seed=s)
        pts, ids = centroids_from_labels(lab)
        items.append((f"s{s}", img, pts, None, [types[i - 1] for i in ids]))
    return items


def test_freeze_trunk_trains_only_the_type_head(tmp_path):
    torch.manual_seed(0)
    start = save_model(PRONet(ModelConfig(width=0.0625)), tmp_path / "start")
    cfg = TrainConfig.recipe(init=str(start), width=0.0625, epochs=1, patch_px=64, patches_per_image=50, batch_size=2,
                             freeze_trunk=True, tune_thresholds=False, num_threads=1)
    out = train(cfg, _typed_items(1, 96), tmp_path / "m", progress=False)
    before, after = load_model(start).model.state_dict(), load_model(out).model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # batch-norm statistics included
    assert load_model(out).config.classes == ("Dark", "Pale")
    with pytest.raises(InputError, match="no classes"):
        train(cfg, [(n, im, p) for n, im, p, *_ in _typed_items(1, 96)], tmp_path / "m2", progress=False)


def test_keep_start_holds_the_nuclei_maps_near_the_start_model(tmp_path):
    """--keep-start: the same fine-tune moves the instance maps less from the start model's, and logs the term."""
    torch.manual_seed(0)
    start = save_model(PRONet(ModelConfig(width=0.0625)), tmp_path / "start")
    items = _typed_items(1, 96)
    x = torch.from_numpy(items[0][1]).permute(2, 0, 1)[None].float() / 255

    def moved(keep: float) -> float:
        cfg = TrainConfig.recipe(init=str(start), width=0.0625, epochs=2, patch_px=64, patches_per_image=200,
                                 batch_size=2, lr=1e-2, tune_thresholds=False, num_threads=1, holdout=0.0,
                                 nucleus_classifier=False, loss=LossConfig(lambda_keep=keep))
        out = train(cfg, items, tmp_path / f"m{keep}", progress=False)
        rows = list(csv.DictReader(open(out / "train" / "log.csv")))
        assert (rows[-1]["keep"] != "") == (keep > 0)
        a, b = load_model(start).model.eval(), load_model(out).model.eval()
        with torch.no_grad():
            fa, fb = a(x), b(x)
        return float(sum((torch.sigmoid(fa[k]) - torch.sigmoid(fb[k])).abs().mean() for k in ("foreground", "centers")))

    assert moved(10.0) < 0.5 * moved(0.0)  # measured 0.03 vs 0.17


def test_type_head_learns_the_class_that_follows_the_look(tmp_path):
    """Acceptance: from the shipped model, classed clicks on two synthetic looks; a held-out image's detected
    nuclei are classified right >= 90 %."""
    torch.manual_seed(0)
    cfg = TrainConfig.recipe(init="default", epochs=12, patch_px=96, patches_per_image=400, tune_thresholds=False,
                             num_threads=2, device="cpu")
    out = train(cfg, _typed_items(3), tmp_path / "m", progress=False)
    predictor = Predictor(out)
    assert predictor.classes == ("Dark", "Pale")
    # no --holdout: the run ends with a nucleus classifier fitted on its clicks, unchecked
    assert predictor.postprocess_config.nucleus_classifier is not None
    img, lab, centers, types = synthetic_typed_nuclei((192, 192), 30, seed=99)
    for config in (replace(predictor.postprocess_config, nucleus_classifier=None), None):  # the head; + classifier
        seg = segment_image(img, predictor, config=config)
        hits = [(seg.labels[int(round(r)), int(round(c))], t) for (r, c), t in zip(centers, types, strict=True)]
        found = [(i, t) for i, t in hits if i > 0]
        right = sum(predictor.classes[seg.class_index[i - 1]] == t for i, t in found)
        assert len(found) >= 0.6 * len(centers)
        assert right >= 0.9 * len(found), (right, len(found), config)


def test_load_items_carries_classes_and_refuses_nothing_silently(tmp_path):
    from PIL import Image

    img, lab, _, types = synthetic_typed_nuclei((64, 64), 6, seed=1)
    Image.fromarray(img).save(tmp_path / "a.png")
    pts, ids = centroids_from_labels(lab)
    write_points_csv(tmp_path / "a.csv", pts, [types[i - 1] for i in ids])
    (name, image, got, region, classes), = load_items(tmp_path, points=tmp_path)
    assert classes == [types[i - 1] for i in ids] and region is None


def test_holdout_keeps_back_images_and_scores_their_clicks(tmp_path):
    from pronet_wsi.training.loop import split_holdout, validate_clicks

    items = _typed_items(4, 96)
    train_part, held = split_holdout(items, 0.25, 0)
    assert len(held) == 1 and len(train_part) == 3 and {i[0] for i in held} | {i[0] for i in train_part} == {
        "s0", "s1", "s2", "s3"}
    with pytest.raises(InputError, match="at least 2"):
        split_holdout(items[:1], 0.25, 0)
    net = PRONet(ModelConfig(width=0.0625, classes=("Dark", "Pale"))).eval()
    predictor = Predictor(load_model(save_model(net, tmp_path / "m")))
    score = validate_clicks(predictor, held, predictor.postprocess_config, 12.0)
    assert 0.0 <= score <= 1.0
    cfg = TrainConfig(epochs=2, width=0.0625, patch_px=64, patches_per_image=50, batch_size=2, holdout=0.25,
                      val_every=1, tune_thresholds=False, num_threads=1, class_weight_min_clicks=1,
                      holdout_min_clicks=1)
    out = train(cfg, items, tmp_path / "t", progress=False)
    log = (out / "train" / "log.csv").read_text().splitlines()
    assert log[0].endswith("val_clicks") and all(line.split(",")[-1] != "" for line in log[1:])
    assert "kept_epoch" in load_model(out).config.extra
    assert len(load_model(out).thresholds.class_weights) == 2  # tuned on the held-back clicks


def test_hold_back_needs_two_images_and_enough_held_back_clicks(caplog):
    from pronet_wsi.training.loop import hold_back

    items = _typed_items(4, 96)
    n_held = sum(len(it[2]) for it in hold_back(items, TrainConfig(holdout=0.25, holdout_min_clicks=1))[1])
    fit, held = hold_back(items, TrainConfig(holdout=0.25, holdout_min_clicks=n_held))
    assert len(fit) == 3 and len(held) == 1
    with caplog.at_level(logging.WARNING):
        fit, held = hold_back(items, TrainConfig(holdout=0.25, holdout_min_clicks=n_held + 1))
        assert fit == items and held == []
        assert f"would hold {n_held} clicks, fewer than {n_held + 1}" in caplog.text
        fit, held = hold_back(items[:1], TrainConfig(holdout=0.25))
        assert fit == items[:1] and held == [] and "one training image" in caplog.text
    assert TrainConfig.recipe(init="default").holdout == 0.1 and TrainConfig.recipe().holdout == 0.0


def test_class_weights_let_a_close_rare_class_win(monkeypatch):
    """Six nuclei: three A sure (0.9), three B that the head leans A on (0.6 / 0.4). Unweighted every nucleus is
    A (mean class F1 0.33); the tuned weights make B win where it is close and score every click right."""
    from types import SimpleNamespace

    from pronet_wsi.postprocess import Segmentation
    from pronet_wsi.training import loop

    xy = np.array([[10.5, 10.5], [30.5, 10.5], [50.5, 10.5], [10.5, 40.5], [30.5, 40.5], [50.5, 40.5]])
    probs = np.array([[0.9, 0.1]] * 3 + [[0.6, 0.4]] * 3, np.float32)
    seg = Segmentation(np.zeros((64, 64), np.int32), xy[:, ::-1] - 0.5, np.ones(6, np.float32), probs)
    monkeypatch.setattr(loop, "postprocess", lambda maps, config: seg)
    model = torch.nn.Linear(1, 1)
    predictor = SimpleNamespace(classes=("A", "B"), model=model, predict_image=lambda image: None)
    items = [("s", np.zeros((64, 64, 3), np.uint8), xy, None, ["A"] * 3 + ["B"] * 3)]
    tuned = loop.tune_class_weights(predictor, items, PostprocessConfig(), 3.0)
    w = np.array(tuned.class_weights)
    assert w[1] / w[0] > 1.5
    assert (reweight_classes(probs, tuned.class_weights).argmax(1) == [0, 0, 0, 1, 1, 1]).all()


def test_detection_thresholds_are_tuned_on_enough_held_back_clicks(monkeypatch):
    """Three clicked nuclei, one faint (centre 0.15), and a small false one (15 px): the start thresholds (0.2,
    10 px) find two of three and the false one; the tuned ones find all three and drop it. With fewer held-back
    clicks than the minimum the thresholds stay."""
    from types import SimpleNamespace

    from pronet_wsi.postprocess import Segmentation
    from pronet_wsi.training import loop

    found = np.array([[10.5, 10.5], [30.5, 10.5], [50.5, 10.5], [50.5, 50.5]])  # xy; the last is not clicked
    peak, area = np.array([0.9, 0.9, 0.15, 0.9]), np.array([60, 60, 60, 15])

    def fake_postprocess(maps, config, image=None):
        keep = (peak >= config.center_threshold) & (area >= config.min_area_px)
        return Segmentation(np.zeros((64, 64), np.int32), found[keep, ::-1] - 0.5, peak[keep].astype(np.float32))

    monkeypatch.setattr(loop, "postprocess", fake_postprocess)
    predictor = SimpleNamespace(classes=(), model=torch.nn.Linear(1, 1), predict_image=lambda image: None, mpp=0.25)
    held = [("s", np.zeros((64, 64, 3), np.uint8), found[:3], None, None)]
    base = PostprocessConfig(center_threshold=0.2, min_area_px=10, foreground_threshold=0.45)
    tuned = loop.tune_click_thresholds(predictor, held, base, 3.0, (10, 20, 40, 80), (0.1, 0.2, 0.3))
    assert (tuned.center_threshold, tuned.min_area_px, tuned.foreground_threshold) == (0.1, 20, 0.45)
    cfg = TrainConfig(holdout_min_clicks=3, tune_min_areas_um2=(1.25, 2.5), tune_center_thresholds=(0.1, 0.2))
    assert (loop.tune_on_clicks(predictor, held, base, cfg).center_threshold,
            loop.tune_on_clicks(predictor, held, base, cfg).min_area_px) == (0.1, 20)
    assert loop.tune_on_clicks(predictor, held, base, replace(cfg, holdout_min_clicks=4)) == base


def test_balanced_class_weights_lift_a_rare_class_softly_and_weight_the_loss():
    from pronet_wsi.training.losses import balanced_class_weights

    w = balanced_class_weights([6000, 4000, 300, 6000])
    assert w[2] == pytest.approx((5000 / 300) ** 0.5, rel=1e-3) and 0.8 < w[0] < 1.0
    assert balanced_class_weights([0, 10]) == (1.0, 1.0) and max(balanced_class_weights([1, 10**6, 10**6])) == 5.0
    logits = torch.zeros(1, 2, 1, 2)
    target = torch.tensor([[[0, 1]]])
    logits[0, 0, 0, 1] = 3.0  # pixel 2 (class 1) is wrong, pixel 1 (class 0) uncertain
    plain, weighted = type_ce(logits, target), type_ce(logits, target, (1.0, 4.0))
    assert float(weighted) > float(plain)


def test_nucleus_classifier_is_fitted_on_training_clicks_and_kept_when_it_beats_the_head(tmp_path):
    """A type head that knows nothing (new, untrained) on the shipped model's nuclei: the classifier learns the
    class from the nuclei's look, beats the head on the held-back clicks, and classes a new image right."""
    from pronet_wsi.training.loop import fit_nucleus_classifier

    torch.manual_seed(0)
    bundle = start_model(TrainConfig(init="default", classes=("Dark", "Pale")), [])
    predictor = Predictor(bundle)
    items = _typed_items(4, 160)
    train_items, held = items[:3], items[3:]
    train_items[0] = (*train_items[0][:4], [""] * len(train_items[0][4]))  # untyped clicks are left out
    base = PostprocessConfig()
    got = fit_nucleus_classifier(predictor, train_items, held, base, 12.0, min_gain=0.05)
    assert got.nucleus_classifier is not None and got.center_threshold == base.center_threshold
    img, _, centers, types = synthetic_typed_nuclei((192, 192), 30, seed=99)
    seg = segment_image(img, predictor, config=got)
    hits = [(seg.labels[int(round(r)), int(round(c))], t) for (r, c), t in zip(centers, types, strict=True)]
    found = [(i, t) for i, t in hits if i > 0]
    right = sum(predictor.classes[seg.class_index[i - 1]] == t for i, t in found)
    assert len(found) >= 0.6 * len(centers) and right >= 0.9 * len(found), (right, len(found))
    # a gain it cannot reach keeps the head
    assert fit_nucleus_classifier(predictor, train_items, held, base, 12.0, min_gain=1.01) == base
