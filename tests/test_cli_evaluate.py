"""`pronet-wsi evaluate PRED_DIR GT_DIR -o CSV`: good runs and one-line errors that leave no CSV behind."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pronet_wsi.cli import main
from pronet_wsi.evaluation import pair_files
from pronet_wsi.images import write_labels, write_png
from pronet_wsi.metrics import evaluate_image
from pronet_wsi.synthetic import synthetic_nuclei


def save_png_labels(path, labels: np.ndarray) -> None:
    Image.fromarray(labels.astype(np.uint16)).save(path)


@pytest.fixture
def folders(tmp_path):
    """pred/ with two uint32 TIFFs and an overlay PNG, gt/ with two uint16 PNGs; returns (pred, gt, truth)."""
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir()
    gt_dir.mkdir()
    truth = {}
    for k, stem in enumerate(["img_a", "img_b"]):
        image, labels, _ = synthetic_nuclei((96, 128), n_nuclei=12, seed=k)
        pred = np.roll(labels, 1 + k, axis=1)
        save_png_labels(gt_dir / f"{stem}.png", labels)
        write_labels(pred_dir / f"{stem}.tif", pred)
        write_png(pred_dir / f"{stem}_overlay.png", image)
        truth[stem] = evaluate_image(labels, pred)
    (pred_dir / "config.json").write_text("{}")
    return pred_dir, gt_dir, truth


def run(*args: str):
    return CliRunner().invoke(main, ["evaluate", *map(str, args)])


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
    lines = [line for line in result.output.strip().splitlines() if line]
    assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_good_run_writes_csv_with_mean_row(folders, tmp_path):
    pred_dir, gt_dir, truth = folders
    out = tmp_path / "res" / "scores.csv"
    result = run(pred_dir, gt_dir, "-o", out)
    assert result.exit_code == 0, result.output
    assert "img_a" in result.output and "mean" in result.output and "overlay" not in result.output
    with open(out, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["image", "object_dice", "pixel_dice", "aji", "pq"]
    assert [r[0] for r in rows[1:]] == ["img_a", "img_b", "mean"]
    values = {r[0]: [float(v) for v in r[1:]] for r in rows[1:]}
    for stem, s in truth.items():
        assert values[stem] == pytest.approx([s.object_dice, s.pixel_dice, s.aji, s.pq], abs=1e-6)
        assert all(0.0 < v < 1.0 for v in values[stem])
    mean = np.mean([values["img_a"], values["img_b"]], axis=0)
    assert values["mean"] == pytest.approx(mean.tolist(), abs=2e-6)
    assert [p.name for p in out.parent.iterdir()] == ["scores.csv"]  # no temporary file left


def test_without_output_prints_only(folders):
    pred_dir, gt_dir, _ = folders
    result = run(pred_dir, gt_dir)
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 2 + 2 + 2 + 1  # header, rule, 2 images, rule, mean, count
    assert lines[-1].startswith("scored 2 prediction")


def test_pairing_skips_overlays_and_sidecars(folders):
    pred_dir, gt_dir, _ = folders
    pairs = pair_files(pred_dir, gt_dir)
    assert [(p.stem, p.pred_path.name, p.gt_path.name) for p in pairs] == [
        ("img_a", "img_a.tif", "img_a.png"), ("img_b", "img_b.tif", "img_b.png")]


def test_missing_ground_truth_file(folders, tmp_path):
    pred_dir, gt_dir, _ = folders
    (gt_dir / "img_b.png").unlink()
    out = tmp_path / "scores.csv"
    assert_one_line_error(run(pred_dir, gt_dir, "-o", out), "img_b", "no ground truth")
    assert not out.exists()


def test_ground_truth_without_prediction_is_left_out(folders, tmp_path):
    pred_dir, gt_dir, _ = folders
    (pred_dir / "img_a.tif").unlink()
    out = tmp_path / "scores.csv"
    res = run(pred_dir, gt_dir, "-o", out)
    assert res.exit_code == 0, res.output
    assert "img_a" not in out.read_text() and "img_b" in out.read_text()


def test_mismatched_stems(folders, tmp_path):
    pred_dir, gt_dir, _ = folders
    (gt_dir / "img_a.png").rename(gt_dir / "other.png")
    out = tmp_path / "scores.csv"
    assert_one_line_error(run(pred_dir, gt_dir, "-o", out), "img_a")
    assert not out.exists()


def test_missing_folder(folders, tmp_path):
    pred_dir, _, _ = folders
    out = tmp_path / "scores.csv"
    assert_one_line_error(run(pred_dir, tmp_path / "nope", "-o", out), "nope", "not found")
    assert not out.exists()


def test_empty_folder(folders, tmp_path):
    _, gt_dir, _ = folders
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "scores.csv"
    assert_one_line_error(run(empty, gt_dir, "-o", out), "empty", "no instance maps")
    assert not out.exists()


def test_non_image_file(folders, tmp_path):
    pred_dir, gt_dir, _ = folders
    (gt_dir / "img_b.png").write_text("not an image")
    out = tmp_path / "scores.csv"
    assert_one_line_error(run(pred_dir, gt_dir, "-o", out), "img_b.png", "cannot be read")
    assert not out.exists()


def test_rgb_image_is_not_an_instance_map(folders, tmp_path):
    pred_dir, gt_dir, _ = folders
    write_png(gt_dir / "img_a.png", np.zeros((96, 128, 3), np.uint8))
    out = tmp_path / "scores.csv"
    assert_one_line_error(run(pred_dir, gt_dir, "-o", out), "img_a.png", "instance map")
    assert not out.exists()


def test_shape_mismatch_names_both_files(folders, tmp_path):
    pred_dir, gt_dir, _ = folders
    save_png_labels(gt_dir / "img_b.png", np.zeros((90, 128), np.uint16))
    out = tmp_path / "scores.csv"
    assert_one_line_error(run(pred_dir, gt_dir, "-o", out), "img_b.tif", "img_b.png", "shapes differ")
    assert not out.exists()


def test_jpeg_and_duplicate_stems_are_refused(folders, tmp_path):
    pred_dir, gt_dir, _ = folders
    write_png(gt_dir / "img_c.jpg", np.zeros((4, 4, 3), np.uint8))
    assert_one_line_error(run(pred_dir, gt_dir), "img_c.jpg", "lossy")
    (gt_dir / "img_c.jpg").unlink()
    save_png_labels(pred_dir / "img_a.png", np.zeros((96, 128), np.uint16))
    assert_one_line_error(run(pred_dir, gt_dir), "img_a", "same stem")


# --- typed detection: <stem>_nuclei.csv predictions against class-labelled clicks ---


def write_nuclei_csv(path, rows) -> None:
    """rows: [(x, y, class)] -> the table `predict` writes (id, x, y, class, class_probability, area_um2)."""
    lines = ["id,x,y,class,class_probability,area_um2"]
    lines += [f"{i},{x},{y},{c},0.9,30.0" for i, (x, y, c) in enumerate(rows, start=1)]
    path.write_text("\n".join(lines) + "\n")


def write_geojson_points(path, groups) -> None:
    """groups: {class name: [(x, y), ...]} -> one QuPath Points annotation per class."""
    import json

    features = [{"type": "Feature", "geometry": {"type": "MultiPoint", "coordinates": [list(p) for p in pts]},
                 "properties": {"objectType": "annotation", "classification": {"name": name}}}
                for name, pts in groups.items()]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))


@pytest.fixture
def typed_folders(tmp_path):
    """img_a: CSV clicks (one untyped), img_b: GeoJSON clicks; predictions with one miss, one wrong class, one
    false detection and one 8 px off (a match at 0.25 um/px, radius 12 px; not at 0.5 um/px, radius 6 px)."""
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir()
    gt_dir.mkdir()
    (gt_dir / "img_a.csv").write_text("x,y,class\n10.5,10.5,Epithelial\n40.5,10.5,Inflammatory\n"
                                      "70.5,10.5,\n100.5,10.5,Epithelial\n")
    write_nuclei_csv(pred_dir / "img_a_nuclei.csv", [(11, 10, "Epithelial"), (40, 11, "Epithelial"),
                                                     (70.5, 10.5, "Inflammatory"), (200, 200, "Inflammatory")])
    write_geojson_points(gt_dir / "img_b.geojson", {"Epithelial": [(20.5, 20.5)], "Inflammatory": [(60.5, 20.5)]})
    write_nuclei_csv(pred_dir / "img_b_nuclei.csv", [(20.5, 28.5, "Epithelial"), (60, 20, "Inflammatory")])
    write_labels(pred_dir / "img_a.tif", np.zeros((8, 8), np.uint32))  # predict's other outputs are ignored
    (gt_dir / "img_c.csv").write_text("x,y,class\n1,1,Epithelial\n")  # no prediction: left out
    return pred_dir, gt_dir


def read_typed_csv(path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as fh:
        return {row["class"]: row for row in csv.DictReader(fh)}


def test_typed_good_run(typed_folders, tmp_path):
    pred_dir, gt_dir = typed_folders
    out = tmp_path / "typed.csv"
    result = run(pred_dir, gt_dir, "-o", out)
    assert result.exit_code == 0, result.output
    assert "Epithelial" in result.output and "F_d" in result.output and "scored 2 image(s)" in result.output
    rows = read_typed_csv(out)
    assert list(rows) == ["Epithelial", "Inflammatory", "mean", "detection"]
    # detection: gt 4 + 2 = 6, pred 4 + 2 = 6; matched a:3 (100.5 missed, 200 false), b:2 -> TP 5, FP 1, FN 1
    det = rows["detection"]
    assert (det["tp"], det["fp"], det["fn"]) == ("5", "1", "1")
    assert float(det["f1"]) == pytest.approx(10 / 12)
    # Epithelial: TP 2 (a 10.5, b 20.5), FP 1 (a 40.5 is Inflammatory), FN 1 (a 100.5 missed)
    epi = rows["Epithelial"]
    assert (epi["n_gt"], epi["n_pred"], epi["tp"], epi["fp"], epi["fn"]) == ("3", "3", "2", "1", "1")
    assert float(epi["f1"]) == pytest.approx(4 / 6)
    assert float(epi["f_c"]) == pytest.approx(4 / (4 + 2 + 1))  # 2 TP / (2 TP + 2 FP_c + FN_d)
    # Inflammatory: TP 1 (b), FN 1 (called Epithelial), FP 1 (200, 200); the one on the untyped click is ignored
    inf = rows["Inflammatory"]
    assert (inf["tp"], inf["fp"], inf["fn"]) == ("1", "1", "1")
    assert float(inf["f_c"]) == pytest.approx(2 / (2 + 2 + 1))
    assert float(rows["mean"]["f1"]) == pytest.approx((4 / 6 + 2 / 4) / 2)
    assert [p.name for p in out.parent.iterdir() if p.name.startswith("typed")] == ["typed.csv"]


def test_typed_radius_follows_mpp(typed_folders):
    pred_dir, gt_dir = typed_folders
    near = run(pred_dir, gt_dir)  # 3 um at 0.25 um/px = 12 px: the 8 px offset matches
    far = run(pred_dir, gt_dir, "--mpp", "0.5")  # 6 px: it does not
    assert near.exit_code == 0 and far.exit_code == 0, far.output
    assert "= 12 px" in near.output and "= 6 px" in far.output
    det = [line.split() for line in (near.output, far.output) for line in [
        next(x for x in line.splitlines() if x.startswith("detection"))]]
    assert det[0][3] == "5" and det[1][3] == "4"  # tp
    assert_one_line_error(run(pred_dir, gt_dir, "--mpp", "0"), "--mpp")


def test_typed_prediction_without_clicks(typed_folders, tmp_path):
    pred_dir, gt_dir = typed_folders
    (gt_dir / "img_b.geojson").unlink()
    out = tmp_path / "typed.csv"
    assert_one_line_error(run(pred_dir, gt_dir, "-o", out), "img_b", "no point file")
    assert not out.exists()


def test_typed_bad_point_file_is_one_line(typed_folders):
    pred_dir, gt_dir = typed_folders
    (gt_dir / "img_a.csv").write_text("a,b\n1,2\n")
    assert_one_line_error(run(pred_dir, gt_dir), "img_a.csv", "x and y")


def test_instance_maps_still_scored_when_tables_sit_beside_them(folders, tmp_path):
    pred_dir, gt_dir, truth = folders
    write_nuclei_csv(pred_dir / "img_a_nuclei.csv", [(5, 5, "Epithelial")])
    out = tmp_path / "scores.csv"
    result = run(pred_dir, gt_dir, "-o", out)
    assert result.exit_code == 0, result.output
    with open(out, newline="") as fh:
        assert next(csv.reader(fh)) == ["image", "object_dice", "pixel_dice", "aji", "pq"]
