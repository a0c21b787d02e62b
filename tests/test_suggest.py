"""`suggest`: unreliable boxes for QuPath, spread out, readable back by `train`."""

import json

import numpy as np
import pytest
import shapely
from click.testing import CliRunner
from wsi_fakes import small_slide, tiny_model_dir

from pronet_wsi.cli import main
from pronet_wsi.suggest import box_unreliability, candidate_centres, choose_boxes
from pronet_wsi.training.inputs import load_slide_items
from pronet_wsi.training.points import read_points, read_regions


def test_unreliability_is_zero_for_sure_consistent_maps_and_high_otherwise():
    sure = np.zeros((32, 32), np.float32)
    sure[8:16, 8:16] = 0.99
    assert box_unreliability({"foreground": sure}, {"foreground": sure})["score"] < 0.02
    unsure = sure * 0.5
    shifted = np.roll(sure, 6, axis=1)
    assert box_unreliability({"foreground": unsure}, {"foreground": unsure})["uncertain"] > 0.9
    assert box_unreliability({"foreground": sure}, {"foreground": shifted})["flip_disagreement"] > 0.4


def test_choose_boxes_rotates_groups_and_keeps_apart():
    centres = np.array([[0, 0], [1, 0], [10, 0], [20, 0], [30, 0]], float)
    scores = np.array([5.0, 4.9, 1.0, 3.0, 2.0])
    groups = np.array([0, 0, 0, 1, 1])
    picks = choose_boxes(scores, centres, groups, 3, min_dist=2.0)
    assert picks == [0, 3, 2] or picks[:2] == [0, 3]
    assert 1 not in picks  # too close to box 0


def test_candidates_cover_the_tissue():
    mask = np.zeros((100, 100), bool)
    mask[10:40, 10:90] = True
    c = candidate_centres(mask, 4.0, 30)
    assert 15 <= len(c) <= 60
    assert (c[:, 0] >= 40).all() and (c[:, 0] <= 360).all() and (c[:, 1] >= 40).all() and (c[:, 1] <= 160).all()


def test_suggest_cli_writes_qupath_annotations_train_can_read(tmp_path):
    model = tiny_model_dir(tmp_path / "m", mpp=0.5)
    slide = small_slide(tmp_path / "s.tif", side=1024, mpp=0.5)
    res = CliRunner().invoke(main, ["suggest", str(slide), "-o", str(tmp_path / "out"), "-m", str(model),
                                    "--boxes", "5", "--box-um", "64"])
    assert res.exit_code == 0, res.output
    fc = json.loads((tmp_path / "out" / "s_suggest.geojson").read_text())
    boxes = [f for f in fc["features"] if f["geometry"]["type"] == "Polygon"]
    points = [f for f in fc["features"] if f["geometry"]["type"] == "MultiPoint"]
    assert len(boxes) == 5 and points
    for f in fc["features"]:
        assert "objectType" not in f and f["properties"]["objectType"] == "annotation"
        geom = shapely.geometry.shape(f["geometry"])
        assert geom.is_valid
    for b in boxes:
        g = shapely.geometry.shape(b["geometry"])
        assert abs(g.area - 128**2) < 1 and b["properties"]["classification"]["name"] == "Click here"
        assert set(b["properties"]["measurements"]) >= {"Unreliability", "Rank"}
    ranks = [b["properties"]["measurements"]["Rank"] for b in boxes]
    assert ranks == sorted(ranks)
    pts = read_points(tmp_path / "out" / "s_suggest.geojson")
    assert len(pts) == sum(len(p["geometry"]["coordinates"]) for p in points)
    inside = [any(shapely.geometry.shape(b["geometry"]).buffer(1).contains(shapely.Point(*p)) for b in boxes)
              for p in pts]
    assert all(inside)
    # the boxes are the complete regions `train --slide` trains on: every suggested point lands in a piece
    assert len(read_regions(tmp_path / "out" / "s_suggest.geojson")) == 5
    items = load_slide_items(slide, tmp_path / "out" / "s_suggest.geojson", mpp=0.5)
    assert sum(int(mask[np.floor(p[:, 1]).astype(int), np.floor(p[:, 0]).astype(int)].sum())
               for _, _, p, mask, _ in items) == len(pts)


def test_type_uncertainty_is_zero_when_sure_and_one_when_uniform():
    from pronet_wsi.suggest import type_uncertainty

    assert type_uncertainty(np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])) == 0.0
    assert abs(type_uncertainty(np.full((4, 3), 1 / 3)) - 1.0) < 1e-9
    assert type_uncertainty(np.zeros((0, 3))) == 0.0


@pytest.mark.parametrize("classifier", [False, True])
def test_suggest_with_a_typed_model_writes_one_classified_points_annotation_per_class(tmp_path, classifier):
    import torch

    from pronet_wsi.classify import NucleusClassifier, feature_names
    from pronet_wsi.model import ModelConfig, PRONet, load_model, save_model
    from pronet_wsi.postprocess import PostprocessConfig
    from pronet_wsi.training.points import read_points_classes

    untyped = load_model(tiny_model_dir(tmp_path / "u", mpp=0.5)).model
    torch.manual_seed(1)
    net = PRONet(ModelConfig(width=0.0625, mpp=0.5, classes=("Tumor", "Immune cells")))
    state = {**net.state_dict(), **untyped.state_dict()}  # the tiny model's nuclei, a random type head
    net.load_state_dict(state)
    f = len(feature_names(net.config.classes))
    sure = NucleusClassifier(feature_names(net.config.classes), 0.5, [0.0] * f, [1.0] * f, [[0.0] * f] * 2,
                             [-10.0, 10.0])  # every nucleus "Immune cells", whatever it looks like
    save_model(net.eval(), tmp_path / "t", PostprocessConfig(nucleus_classifier=sure if classifier else None))
    slide = small_slide(tmp_path / "s.tif", side=512, mpp=0.5)
    res = CliRunner().invoke(main, ["suggest", str(slide), "-o", str(tmp_path / "out"), "-m", str(tmp_path / "t"),
                                    "--boxes", "3", "--box-um", "64"])
    assert res.exit_code == 0, res.output
    fc = json.loads((tmp_path / "out" / "s_suggest.geojson").read_text())
    boxes = [f for f in fc["features"] if f["geometry"]["type"] == "Polygon"]
    assert all(0 <= b["properties"]["measurements"]["Type uncertainty"] <= 1 for b in boxes)
    names = {f["properties"]["classification"]["name"] for f in fc["features"] if f["geometry"]["type"] ==
             "MultiPoint"}
    assert names and names <= {"Tumor", "Immune cells"}
    _, classes = read_points_classes(tmp_path / "out" / "s_suggest.geojson")
    assert set(classes) == names  # the typed points read back with their classes, for `train`
    if classifier:  # the boxes' pixels reach the classifier: every nucleus its class, none uncertain
        assert names == {"Immune cells"}
        assert all(b["properties"]["measurements"]["Type uncertainty"] < 1e-6 for b in boxes)


def test_old_box_options_name_the_new_ones(tmp_path):
    res = CliRunner().invoke(main, ["suggest", str(tmp_path / "s.tif"), "-o", str(tmp_path / "out"),
                                    "--regions", "5"])
    assert res.exit_code == 2 and "--boxes" in res.output and "--box-um" in res.output
    res = CliRunner().invoke(main, ["suggest", str(tmp_path / "s.tif"), "-o", str(tmp_path / "out"),
                                    "--boxes", "0"])
    assert res.exit_code == 1 and "--boxes 0" in res.output
