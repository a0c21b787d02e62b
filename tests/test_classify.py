"""The nucleus classifier: features per nucleus, the logistic regression as plain numbers, and its use in
post-processing and training."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import numpy as np
import pytest
from skimage.draw import ellipse

from pronet_wsi.classify import (
    LOOK_FEATURES,
    NucleusClassifier,
    classify,
    feature_names,
    fit_classifier,
    neighbour_mean,
    nucleus_features,
)
from pronet_wsi.errors import InputError
from pronet_wsi.postprocess import PostprocessConfig, postprocess


def _two_nuclei() -> tuple[np.ndarray, np.ndarray]:
    """An ellipse (semi-axes 12 and 6 px) of colour (60, 20, 120) and a disc (radius 8) of (200, 100, 150) on
    a (240, 200, 220) background."""
    labels = np.zeros((80, 120), np.int32)
    labels[ellipse(40, 30, 6, 12)] = 1
    rr, cc = np.ogrid[:80, :120]
    labels[(rr - 40) ** 2 + (cc - 85) ** 2 <= 64] = 2
    image = np.empty((80, 120, 3), np.uint8)
    image[:] = (240, 200, 220)
    image[labels == 1] = (60, 20, 120)
    image[labels == 2] = (200, 100, 150)
    return image, labels


def test_features_measure_shape_and_colour_inside_and_around():
    image, labels = _two_nuclei()
    probs = np.array([[0.9, 0.1], [0.2, 0.8]], np.float32)
    f = nucleus_features(image, labels, probs, mpp=0.5)
    col = {name: f[:, i] for i, name in enumerate(feature_names(("A", "B")))}
    assert f.shape == (2, len(LOOK_FEATURES) + 4)
    np.testing.assert_allclose(col["area um2"], [(labels == 1).sum() * 0.25, (labels == 2).sum() * 0.25])
    np.testing.assert_allclose(col["major axis um"], [24 * 0.5, 16 * 0.5], rtol=0.05)  # 2 x semi-axis, in um
    np.testing.assert_allclose(col["minor axis um"], [12 * 0.5, 16 * 0.5], rtol=0.08)
    assert col["eccentricity"][0] == pytest.approx(np.sqrt(1 - 0.25), abs=0.03) and col["eccentricity"][1] < 0.1
    np.testing.assert_allclose(col["nucleus R mean"], [60, 200])
    np.testing.assert_allclose(col["nucleus G std"], [0, 0], atol=1e-9)
    np.testing.assert_allclose(col["ring B mean"], [220, 220])  # the ring is the background
    assert col["nucleus Hematoxylin OD mean"][0] > col["nucleus Hematoxylin OD mean"][1] > col[
        "ring Hematoxylin OD mean"][0]
    np.testing.assert_allclose(col["log p(B)"], np.log([0.1, 0.8]), rtol=1e-6)
    # 55 px = 27.5 um apart at 0.5 um/px: beyond NEIGHBOUR_UM, so no neighbours (uniform)
    np.testing.assert_allclose(col["neighbours log p(A)"], np.log([0.5, 0.5]), rtol=1e-6)


def test_neighbour_features_are_the_mean_class_probabilities_of_the_nuclei_around():
    image, labels = _two_nuclei()
    probs = np.array([[0.9, 0.1], [0.2, 0.8]], np.float32)
    f = nucleus_features(image, labels, probs, mpp=0.25)  # 55 px = 13.75 um apart: neighbours
    col = {name: f[:, i] for i, name in enumerate(feature_names(("A", "B")))}
    np.testing.assert_allclose(col["neighbours log p(A)"], np.log([0.2, 0.9]), rtol=1e-6)
    np.testing.assert_allclose(col["neighbours log p(B)"], np.log([0.8, 0.1]), rtol=1e-6)
    points = np.array([[0.0, 0.0], [0.0, 3.0], [0.0, 5.0], [0.0, 50.0]])
    values = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [1.0, 0.0]])
    near = neighbour_mean(points, values, radius=4.0)  # 0-1 and 1-2 are neighbours; 3 stands alone
    np.testing.assert_allclose(near, [[0.0, 1.0], [0.75, 0.25], [0.0, 1.0], [0.5, 0.5]])


def test_a_nucleus_gets_the_same_features_wherever_its_tile_cuts():
    """Only the nucleus, its ring and its neighbours count: shifting the crop (another tile) leaves the features as
    they are."""
    image, labels = _two_nuclei()
    probs = np.array([[0.9, 0.1], [0.2, 0.8]], np.float32)
    whole = nucleus_features(image, labels, probs, mpp=0.25)
    crop = nucleus_features(image[10:, 5:110], labels[10:, 5:110], probs, mpp=0.25)
    np.testing.assert_allclose(crop, whole, rtol=1e-9, atol=1e-9)


def test_fit_learns_the_class_from_the_look_and_a_missing_class_never_wins():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3))
    y = np.where(x[:, 1] > 0, 2, 0)  # class 1 ("B") has no examples
    clf = fit_classifier(x, y, ("A", "B", "C"), mpp=0.25, names=("u", "v", "w"))
    assert clf.features == ("u", "v", "w") and len(clf.coef) == 3
    p = clf.predict_proba(x)
    assert ((p.argmax(1) == y).mean()) > 0.95 and p[:, 1].max() < 1e-6
    np.testing.assert_allclose(p.sum(1), 1, rtol=1e-6)
    two = fit_classifier(x, np.where(x[:, 0] > 0, 1, 0), ("A", "B"), mpp=0.25, names=("u", "v", "w"))
    assert (two.predict_proba(x).argmax(1) == (x[:, 0] > 0)).mean() > 0.95


def test_classifier_round_trips_through_thresholds_json_and_is_checked():
    names = feature_names(("A", "B"))
    f = len(names)
    clf = NucleusClassifier(names, 0.25, [0.0] * f, [1.0] * f, [[0.0] * f, [0.1] * f], [0.0, 1.0])
    cfg = PostprocessConfig(nucleus_classifier=clf)
    back = PostprocessConfig(**json.loads(json.dumps(asdict(cfg))))
    assert back == cfg and hash(back) == hash(cfg)
    with pytest.raises(InputError, match="features"):
        NucleusClassifier(names, 0.25, [0.0] * (f - 1), [1.0] * f, [[0.0] * f] * 2, [0.0, 1.0])
    with pytest.raises(InputError, match="scale"):
        NucleusClassifier(names, 0.25, [0.0] * f, [0.0] * f, [[0.0] * f] * 2, [0.0, 1.0])
    with pytest.raises(InputError, match="unexpected"):
        NucleusClassifier.from_json({**asdict(clf), "extra": 1})
    clf.check_classes(("A", "B"))
    with pytest.raises(InputError, match="other features or classes"):
        clf.check_classes(("A", "C"))


def test_a_classifier_fitted_before_the_neighbour_features_still_loads_and_classes():
    """thresholds.json written before the neighbours' columns: its features are a prefix of today's, checked and
    applied on those columns alone."""
    image, labels = _two_nuclei()
    probs = np.array([[0.9, 0.1], [0.2, 0.8]], np.float32)
    old = feature_names(("A", "B"))[:len(LOOK_FEATURES) + 2]
    f = len(old)
    coef = np.zeros((2, f))
    coef[0, old.index("log p(B)")] = coef[1, old.index("log p(A)")] = 1.0  # swaps the head's classes
    clf = NucleusClassifier(old, 0.25, [0.0] * f, [1.0] * f, coef.tolist(), [0.0, 0.0])
    clf.check_classes(("A", "B"))
    assert classify(image, labels, probs, clf).argmax(1).tolist() == [1, 0]


def test_load_model_refuses_a_classifier_for_other_classes(tmp_path):
    from pronet_wsi.model import ModelConfig, PRONet, load_model, save_model

    names = feature_names(("A", "C"))
    f = len(names)
    clf = NucleusClassifier(names, 0.25, [0.0] * f, [1.0] * f, [[0.0] * f] * 2, [0.0, 0.0])
    path = save_model(PRONet(ModelConfig(width=0.0625, classes=("A", "B"))), tmp_path / "m",
                      PostprocessConfig(nucleus_classifier=clf))
    with pytest.raises(InputError, match="thresholds.json"):
        load_model(path)


def _maps(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Maps that post-process to ``labels``' two nuclei, with a type head that cannot tell them apart."""
    from pronet_wsi.training.targets import encode_maps

    maps = encode_maps(labels)
    maps["types"] = np.full((2, *labels.shape), 0.5, np.float32)
    return maps


def test_postprocess_classes_nuclei_by_look_with_a_classifier_and_needs_the_image():
    image, labels = _two_nuclei()
    maps = _maps(labels)
    plain = postprocess(maps, PostprocessConfig(min_area_px=5))
    assert plain.n == 2 and (plain.type_probs == 0.5).all()
    f = nucleus_features(image, plain.labels, plain.type_probs, 0.25)
    y = np.array([0 if i == plain.labels[40, 30] else 1 for i in (1, 2)])  # the ellipse is dark
    clf = fit_classifier(f, y, ("Dark", "Pale"), mpp=0.25)  # red channel: 60 dark, 200 pale
    cfg = PostprocessConfig(min_area_px=5, nucleus_classifier=clf)
    seg = postprocess(maps, cfg, image)
    dark = seg.labels[40, 30] - 1
    assert seg.class_index[dark] == 0 and seg.class_index[1 - dark] == 1 and (seg.class_prob > 0.5).all()
    with pytest.raises(ValueError, match="needs the image"):
        postprocess(maps, cfg)
    assert postprocess(maps, replace(cfg, nucleus_classifier=None)).n == 2  # untyped use stays image-free
