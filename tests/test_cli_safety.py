"""Issue 17: nothing overwritten, nothing mixed, nothing silent.

Each numbered row and minor item of the issue through the CLI, and :func:`test_every_bad_input_is_one_line` that
runs every bad-input case of ``test_safety.py`` and of issue 17: one line on stderr, exit != 0, and no file that
was there before changed (checksums of the whole test folder before and after).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from click.testing import CliRunner
from PIL import Image
from wsi_fakes import small_slide, tiny_model_dir

import pronet_wsi.images as images_mod
from pronet_wsi.cli import check_tile_memory, main
from pronet_wsi.errors import InputError
from pronet_wsi.model import ModelConfig, PRONet, save_model
from pronet_wsi.synthetic import synthetic_nuclei

SEG = ["--tile-px", "256", "--halo-px", "32", "--quiet"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line(res) -> str:
    """Exit != 0, no traceback, exactly one non-empty line on stderr (and none on stdout)."""
    assert res.exit_code not in (0, None), res.output
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit), repr(res.exception)
    err = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and not res.stdout.strip(), res.output
    assert "Traceback" not in res.output and "[Errno" not in res.output
    return err[0]


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def unchanged(before: dict[str, str], root: Path) -> None:
    after = snapshot(root)
    changed = [k for k, v in before.items() if after.get(k) != v]
    assert not changed, changed


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("model"), mpp=0.5)


def _rgb(seed: int = 0, shape=(96, 96)) -> np.ndarray:
    return synthetic_nuclei(shape, 8, seed=seed)[0]


# -- row 1: predict never replaces the user's TIFF ---------------------------------------------------------------
def test_row1_predict_keeps_users_tiff(tmp_path, model_dir):
    Image.fromarray(_rgb()).save(tmp_path / "img.png")
    tifffile.imwrite(tmp_path / "img.tif", _rgb(1), photometric="rgb")
    before = snapshot(tmp_path)
    line = one_line(run("predict", tmp_path / "img.png", "-o", tmp_path, "-m", model_dir))
    assert "img.tif" in line and "--overwrite" in line
    unchanged(before, tmp_path)
    out = tmp_path / "out"
    for _ in range(2):  # its own outputs are replaced on a rerun without --overwrite
        assert run("predict", tmp_path / "img.png", "-o", out, "-m", model_dir).exit_code == 0
    res = run("predict", tmp_path / "img.png", "-o", tmp_path, "-m", model_dir, "--overwrite")
    assert res.exit_code == 0, res.output  # asked for: the foreign file is replaced (it is not an input)


# -- row 2: no derived name of one slide replaces another input --------------------------------------------------
def test_row2_segment_tissue_png_of_one_slide_is_another_input(tmp_path, model_dir):
    Image.fromarray(_rgb(0, (256, 256))).save(tmp_path / "x.png")
    Image.fromarray(_rgb(1, (256, 256))).save(tmp_path / "x_tissue.png")
    before = snapshot(tmp_path)
    line = one_line(run("segment", tmp_path / "x.png", tmp_path / "x_tissue.png", "-o", tmp_path, "-m", model_dir,
                        "--mpp", 0.5, *SEG, "--overwrite"))
    assert "x_tissue.png" in line and "input" in line
    unchanged(before, tmp_path)


# -- row 3: the user's own <stem>.json is not a run record -------------------------------------------------------
def test_row3_segment_keeps_users_json(tmp_path, model_dir):
    slide = small_slide(tmp_path / "slide.tif", side=256)
    (tmp_path / "slide.json").write_text('{"stain": "H&E", "notes": "mine"}')
    before = snapshot(tmp_path)
    line = one_line(run("segment", slide, "-o", tmp_path, "-m", model_dir, *SEG))
    assert "slide.json" in line and "--overwrite" in line
    unchanged(before, tmp_path)


# -- row 4: report files replace only reports --------------------------------------------------------------------
def test_row4_reports_never_replace_other_files(tmp_path, model_dir):
    gt, pred, out = tmp_path / "gt", tmp_path / "pred", tmp_path / "out"
    gt.mkdir()
    lab = synthetic_nuclei((64, 64), 4, seed=0)[1].astype(np.uint16)
    tifffile.imwrite(gt / "img.tif", lab)
    pred.mkdir()
    tifffile.imwrite(pred / "img.tif", lab)
    slide = small_slide(tmp_path / "s.tif", side=256)
    assert run("segment", slide, "-o", out, "-m", model_dir, *SEG).exit_code == 0
    before = snapshot(tmp_path)
    assert "not a CSV report" in one_line(run("evaluate", pred, gt, "-o", gt / "img.tif"))
    assert "not a CSV report" in one_line(run("summary", out, "-o", out / "s.geojson"))
    unchanged(before, tmp_path)
    for _ in range(2):  # its own CSVs are replaced on a rerun
        assert run("evaluate", pred, gt, "-o", tmp_path / "scores.csv").exit_code == 0
        assert run("summary", out).exit_code == 0


# -- row 6 and the context_px minor: model folders are checked on load -------------------------------------------
@pytest.mark.parametrize("field,value", [("mean", [float("nan"), 0.5, 0.5]), ("std", [0.2, 0.0, 0.2]),
                                         ("context_px", -5)])
def test_row6_model_folder_fields_are_validated(tmp_path, field, value):
    mdir = save_model(PRONet(ModelConfig(width=0.0625)), tmp_path / "m")
    cfg = json.loads((mdir / "config.json").read_text())
    cfg[field] = value
    (mdir / "config.json").write_text(json.dumps(cfg))
    Image.fromarray(_rgb()).save(tmp_path / "a.png")
    line = one_line(run("predict", tmp_path / "a.png", "-o", tmp_path / "o", "-m", mdir))
    assert f"{field}=" in line and "config.json" in line and "halo_px" not in line
    slide = small_slide(tmp_path / "s.tif", side=256)
    line = one_line(run("segment", slide, "-o", tmp_path / "o", "-m", mdir, "--quiet"))
    assert f"{field}=" in line and "halo_px" not in line
    assert not (tmp_path / "o").exists()


# -- row 7: 12-bit data in a 16-bit TIFF -------------------------------------------------------------------------
def test_row7_twelve_bit_tiff_is_read_by_its_range(tmp_path, model_dir):
    img = _rgb(0, (256, 256))
    tifffile.imwrite(tmp_path / "rgb12.tif", img.astype("uint16") * 16, photometric="rgb")
    read = images_mod.read_image(tmp_path / "rgb12.tif", notes := [])
    assert np.abs(read.astype(int) - img).max() <= 1 and "12-bit" in notes[0]
    res = run("predict", tmp_path / "rgb12.tif", "-o", tmp_path / "p", "-m", model_dir)
    assert res.exit_code == 0 and "12-bit" in res.stderr, res.output
    res = run("segment", tmp_path / "rgb12.tif", "-o", tmp_path / "s", "-m", model_dir, "--mpp", 0.5, *SEG)
    assert res.exit_code == 0 and "12-bit" in res.stderr, res.output
    record = json.loads((tmp_path / "s" / "rgb12.json").read_text())
    assert any("12-bit" in n for n in record["slide"]["notes"]) and record["slide"]["pixel_max"] == 4095
    from pronet_wsi.slide import open_slide

    with open_slide(tmp_path / "rgb12.tif", mpp=0.5) as s:
        assert np.abs(s.read_level(0, 0, 0, (256, 256)).astype(int) - img).max() <= 1


def test_sixteen_bit_full_range_is_scaled_as_before(tmp_path):
    img = _rgb()
    tifffile.imwrite(tmp_path / "c16.tif", img.astype(np.uint16) * 257, photometric="rgb")
    notes: list[str] = []
    assert np.array_equal(images_mod.read_image(tmp_path / "c16.tif", notes), img) and not notes


# -- row 8 and the /proc minor: OS errors are one line with the path ---------------------------------------------
def test_row8_disk_full_during_predict_is_one_line(tmp_path, model_dir, monkeypatch):
    Image.fromarray(_rgb()).save(tmp_path / "a.png")

    def full(path, write):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(images_mod, "atomic_write", full)
    line = one_line(run("predict", tmp_path / "a.png", "-o", tmp_path / "o", "-m", model_dir))
    assert "No space left on device" in line and "a.tif" in line and "free space" in line


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs /proc")
def test_unwritable_output_is_one_line_with_remedy(tmp_path, model_dir):
    Image.fromarray(_rgb()).save(tmp_path / "a.png")
    (tmp_path / "gt").mkdir()
    tifffile.imwrite(tmp_path / "gt" / "a.tif", synthetic_nuclei((64, 64), 4)[1].astype(np.uint16))
    for args in (["predict", tmp_path / "a.png", "-o", "/proc/x", "-m", model_dir],
                 ["evaluate", tmp_path / "gt", tmp_path / "gt", "-o", "/proc/x/scores.csv"],
                 ["train", "--images", tmp_path, "--labels", tmp_path / "gt", "-o", "/proc/x", "--epochs", 1]):
        line = one_line(run(*args))
        assert "/proc/x" in line and ("choose another -o" in line or "check the path" in line), line


# -- row 10: unmatched training inputs ---------------------------------------------------------------------------
def test_row10_train_lists_unmatched_inputs(tmp_path):
    for name in ("a", "b"):
        Image.fromarray(_rgb()).save(tmp_path / f"{name}.png")
    (tmp_path / "a.csv").write_text("x,y\n10,10\n30,30\n")
    (tmp_path / "c.csv").write_text("x,y\n10,10\n")
    for extra in ([], ["-v"]):
        line = one_line(run(*extra, "train", "--images", tmp_path, "--points", tmp_path, "-o", tmp_path / "m",
                            "--epochs", 1, "--quiet"))
        assert "b.png" in line and "c.csv" in line and "--drop-unmatched" in line
    assert "--drop-unmatched" in run("train", "--help").output


# -- minor items -------------------------------------------------------------------------------------------------
def test_segment_grayscale_says_why(tmp_path, model_dir):
    Image.fromarray(_rgb()[..., 0]).save(tmp_path / "gray.png")
    line = one_line(run("segment", tmp_path / "gray.png", "-o", tmp_path / "o", "-m", model_dir, "--mpp", 0.5))
    assert "grayscale" in line and "RGB" in line


def test_huge_batch_advises_a_smaller_batch():
    with pytest.raises(InputError, match="--batch-size") as err:
        check_tile_memory(256, 100000)
    assert "--tile-px 256 or less" not in str(err.value)


def test_other_slide_with_the_same_stem_is_not_skipped(tmp_path, model_dir):
    out = tmp_path / "out"
    a = small_slide((tmp_path / "a").mkdir() or tmp_path / "a" / "s.tif", side=256)
    b = small_slide((tmp_path / "b").mkdir() or tmp_path / "b" / "s.tif", seed=1, side=256)
    assert run("segment", a, "-o", out, "-m", model_dir, *SEG).exit_code == 0
    assert "skipped" in run("segment", a, "-o", out, "-m", model_dir, *SEG).output  # the same slide: skipped
    before = snapshot(tmp_path)
    assert "another slide" in one_line(run("segment", b, "-o", out, "-m", model_dir, *SEG))
    line = one_line(run("segment", tmp_path / "nowhere" / "s.tif", "-o", out, "-m", model_dir, *SEG))
    assert "skipped" not in line
    unchanged(before, tmp_path)


@pytest.mark.parametrize("value", ["nan", "-1"])
def test_max_minutes_must_be_positive(tmp_path, value):
    Image.fromarray(_rgb()).save(tmp_path / "a.png")
    (tmp_path / "a.csv").write_text("x,y\n10,10\n30,30\n")
    line = one_line(run("train", "--images", tmp_path, "--points", tmp_path, "-o", tmp_path / "m",
                        "--max-minutes", value, "--quiet"))
    assert "--max-minutes" in line and not (tmp_path / "m").exists()


def test_resume_honours_epochs_and_log_has_each_epoch_once(tmp_path):
    import csv

    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    Image.fromarray(_rgb(0, (96, 96))).save(img_dir / "a.png")
    (img_dir / "a.csv").write_text("x,y\n20,20\n50,60\n70,30\n")
    tiny = ["--width", "0.0625", "--patch-px", "64", "--patches-per-image", "2", "--batch-size", "2", "--quiet",
            "--images", img_dir, "--points", img_dir, "-o", tmp_path / "m"]
    assert run("train", *tiny, "--epochs", 1).exit_code == 0
    res = run("train", *tiny, "--epochs", 2, "--resume")
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(tmp_path / "m" / "train" / "log.csv")))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert json.loads((tmp_path / "m" / "config.json").read_text())["extra"]["epochs_trained"] == 2
    assert "--epochs more than 2" in one_line(run("train", *tiny, "--resume"))


def test_option_errors_leave_no_empty_outdir(tmp_path, model_dir):
    slide = small_slide(tmp_path / "s.tif", side=256)
    one_line(run("segment", slide, "-o", tmp_path / "o1", "-m", model_dir, "--workers", 999))
    one_line(run("segment", slide, "-o", tmp_path / "o2", "-m", tmp_path / "nope"))
    Image.fromarray(_rgb()).save(tmp_path / "a.png")
    one_line(run("predict", tmp_path / "a.png", "-o", tmp_path / "o3", "-m", tmp_path / "nope"))
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3))


def test_binary_mask_ground_truth_is_refused(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    lab = synthetic_nuclei((64, 64), 4)[1]
    Image.fromarray(((lab > 0) * 255).astype(np.uint8)).save(gt / "a.png")
    tifffile.imwrite(pred / "a.tif", lab.astype(np.uint16))
    line = one_line(run("evaluate", pred, gt))
    assert "binary mask" in line and "a.png" in line


def test_pickled_weights_one_whole_line(tmp_path):
    mdir = save_model(PRONet(ModelConfig(width=0.0625)), tmp_path / "m")
    cfg = json.loads((mdir / "config.json").read_text())
    cfg.pop("weights_sha256")
    (mdir / "config.json").write_text(json.dumps(cfg))
    torch.save(PRONet(ModelConfig(width=0.0625)), mdir / "weights.pt")
    Image.fromarray(_rgb()).save(tmp_path / "a.png")
    line = one_line(run("predict", tmp_path / "a.png", "-o", tmp_path / "o", "-m", mdir))
    assert "weights.pt: a pickled object, not a plain state dict (" in line and line.endswith("reinstall the model")
    assert "\x1b" not in line and "you t)" not in line  # torch's message (with colour codes) cut mid-word
    import warnings

    from pronet_wsi.model import load_model

    with warnings.catch_warnings(record=True) as caught, pytest.raises(InputError):
        warnings.simplefilter("always")
        load_model(mdir)
    assert not caught, [str(w.message) for w in caught]


# -- the acceptance: every bad input, one line, nothing changed --------------------------------------------------
def _cases(tmp: Path, model_dir: Path) -> list[list]:
    """Bad-input command lines of test_safety.py and of issue 17 (their files made under ``tmp``)."""
    img = tmp / "in" / "a.png"
    img.parent.mkdir()
    Image.fromarray(_rgb()).save(img)
    slide = small_slide(tmp / "in" / "s.tif", side=256)
    out = tmp / "out"
    out.mkdir()
    (out / "a.tif").write_bytes(b"user's tiff")
    (out / "s.json").write_text('{"mine": true}')
    (out / "big.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    scan = tmp / "in" / "scan.tif"
    tifffile.imwrite(scan, np.full((256, 256, 3), 200, np.uint8), resolution=(300, 300), resolutionunit="INCH",
                     photometric="rgb")
    Image.fromarray(_rgb()[..., 0]).save(tmp / "in" / "gray.png")
    (tmp / "in" / "a_tissue.png").write_bytes(img.read_bytes())
    tifffile.imwrite(tmp / "in" / "rgb12.tif", _rgb().astype("uint16") * 16, photometric="rgb")
    bad = {}
    for name, edit in (("nanmean", {"mean": [float("nan"), 0.5, 0.5]}), ("std0", {"std": [0.2, 0, 0.2]}),
                       ("ctx", {"context_px": -5})):
        d = shutil.copytree(model_dir, tmp / "models" / name)
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(edit)
        (d / "config.json").write_text(json.dumps(cfg))
        bad[name] = d
    damaged = shutil.copytree(model_dir, tmp / "models" / "damaged")
    data = bytearray((damaged / "weights.pt").read_bytes())
    data[len(data) // 2 : len(data) // 2 + 500] = bytes(500)
    (damaged / "weights.pt").write_bytes(bytes(data))
    pts = tmp / "pts"
    pts.mkdir()
    (pts / "a.csv").write_text("x,y\n10,10\n500,20\n")
    (pts / "zz.csv").write_text("x,y\n10,10\n")
    outside = tmp / "outside"
    outside.mkdir()
    (outside / "a.csv").write_text("x,y\n10,10\n500,20\n")
    tif_in = tmp / "in" / "t.tif"
    tifffile.imwrite(tif_in, _rgb(), photometric="rgb")
    ckpt = tmp / "run" / "train"
    ckpt.mkdir(parents=True)
    (ckpt / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    gt = tmp / "gt"
    gt.mkdir()
    Image.fromarray(((synthetic_nuclei((96, 96), 4)[1] > 0) * 255).astype(np.uint8)).save(gt / "a.png")
    pred = tmp / "pred"
    pred.mkdir()
    tifffile.imwrite(pred / "a.tif", synthetic_nuclei((96, 96), 4)[1].astype(np.uint16))
    m = ["-m", model_dir]
    return [
        # test_safety.py
        ["segment", slide, "-o", out / "o", *m, "--tile-px", 16384, "--batch-size", 64],
        ["segment", slide, "-o", out / "o", "-m", tmp / "nope"],
        ["segment", tmp / "missing.svs", "-o", out / "o", *m, "--quiet"],
        ["segment", scan, "-o", out / "o", *m, "--mpp", 50],
        ["predict", img, "-o", out / "o", *m, "--mpp", 300],
        ["predict", img, "-o", out / "o", *m, "--mpp", 0.01],
        ["predict", tmp / "missing.png", "-o", out / "o", *m],
        ["predict", img, "-o", img.parent, "-m", damaged],
        ["train", "--images", tmp / "none", "--labels", tmp, "-o", tmp / "m"],
        ["train", "--images", img.parent, "--labels", img.parent, "-o", tmp / "run", "--resume", "--quiet"],
        ["predict", tif_in, "-o", tif_in.parent, *m],  # the output t.tif would be the input
        ["train", "--images", img.parent, "--points", outside, "-o", tmp / "m", "--epochs", 1, "--quiet",
         "--drop-unmatched"],  # a point outside its image
        # issue 17
        ["predict", img, "-o", out, *m],  # row 1
        ["segment", img, tmp / "in" / "a_tissue.png", "-o", tmp / "in", *m, "--mpp", 0.5],  # row 2
        ["segment", slide, "-o", out, *m, "--quiet"],  # row 3
        ["evaluate", pred, gt, "-o", gt / "a.png"],  # row 4
        ["summary", out, "-o", out / "big.geojson"],
        ["predict", img, "-o", out / "o", "-m", bad["nanmean"]],  # row 6
        ["predict", img, "-o", out / "o", "-m", bad["std0"]],
        ["segment", slide, "-o", out / "o", "-m", bad["ctx"], "--quiet"],
        ["segment", slide, "-o", out / "o", *m, "--scheduler", "tcp://127.0.0.1:1", "--connect-timeout", 2],  # 9
        ["train", "--images", img.parent, "--points", pts, "-o", tmp / "m", "--epochs", 1, "--quiet"],  # row 10
        ["segment", tmp / "in" / "gray.png", "-o", out / "o", *m, "--mpp", 0.5],
        ["segment", slide, "-o", out / "o", *m, "--tile-px", 256, "--batch-size", 100000],
        ["predict", img, "-o", "/proc/x", *m],
        ["train", "--images", img.parent, "--points", pts, "-o", tmp / "m", "--max-minutes", "nan"],
        ["train", "--images", img.parent, "--points", pts, "-o", tmp / "m", "--max-minutes", "-1"],
        ["segment", slide, "-o", out / "o", *m, "--workers", 999],
        ["evaluate", pred, gt],
    ]


def test_every_bad_input_is_one_line(tmp_path, model_dir):
    cases = _cases(tmp_path, model_dir)
    for args in cases:
        before = snapshot(tmp_path)
        res = run(*args)
        try:
            one_line(res)
            unchanged(before, tmp_path)
        except AssertionError as exc:
            raise AssertionError(f"{[str(a) for a in args]}: {exc}") from exc
