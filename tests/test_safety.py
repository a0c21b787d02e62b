"""Issue 11: no lost output, no code run from files, one-line errors for bad input (each row of the issue)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from click.testing import CliRunner
from PIL import Image
from wsi_fakes import small_slide, tiny_model_dir

from pronet_wsi.cli import main
from pronet_wsi.errors import InputError
from pronet_wsi.files import FILE_MODE, LockHeld, OutputLock
from pronet_wsi.inference import InferenceConfig, Predictor
from pronet_wsi.model import ModelConfig, PRONet, load_model, save_model
from pronet_wsi.synthetic import synthetic_nuclei
from pronet_wsi.tiling import TilingConfig
from pronet_wsi.training.loop import load_checkpoint
from pronet_wsi.wsi.pipeline import SegmentConfig, segment_slide


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(res) -> str:
    """The CLI failed with exactly one non-empty line of output and no traceback."""
    assert res.exit_code not in (0, None), res.output
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit), repr(res.exception)
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1, res.output
    assert "Traceback" not in res.output
    return lines[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("model"), mpp=0.5)


@pytest.fixture
def image_png(tmp_path):
    img, _, _ = synthetic_nuclei((96, 96), 8)
    p = tmp_path / "a.png"
    Image.fromarray(img).save(p)
    return p


# -- row 2: two runs on one slide ---------------------------------------------------------------------------------
def test_second_run_does_not_harm_first(tmp_path, model_dir):
    """Two real processes on one slide: the second waits out (locked) or skips; the first's output survives."""
    slide = small_slide(tmp_path / "s.tif", side=1536, mpp=0.5)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pronet_wsi", "segment", str(slide), "-o", str(out), "-m", str(model_dir),
           "--tile-px", "256", "--halo-px", "32", "--workers", "1", "--quiet"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = out / ".s.lock"
    deadline = time.monotonic() + 120
    while not lock.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    o1, e1 = first.communicate(timeout=300)
    assert first.returncode == 0, e1
    geo = out / "s.geojson"
    assert geo.exists() and json.loads(geo.read_text())["type"] == "FeatureCollection"
    assert json.loads((out / "s.json").read_text())["status"] == "done"
    if second.returncode:  # it overlapped: one line naming the other run, nothing of the first's touched
        assert "another run" in second.stderr and f"pid {first.pid}" in second.stderr, second.stderr
    else:
        assert "skipped" in second.stdout
    assert not lock.exists() and not list(out.glob(".*.tmp"))


def test_stale_lock_of_dead_process_is_taken_over(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(proc.stdout)
    lock_path = tmp_path / ".x.lock"
    import socket

    lock_path.write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid, "started": "then"}))
    with OutputLock(lock_path, "x") as lock:
        assert lock.held and json.loads(lock_path.read_text())["pid"] == os.getpid()
        with pytest.raises(LockHeld, match=f"pid {os.getpid()}"):
            OutputLock(lock_path, "x").acquire()
    assert not lock_path.exists()


# -- row 3: predict never overwrites its input --------------------------------------------------------------------
def test_predict_refuses_to_overwrite_input(tmp_path, model_dir):
    img, _, _ = synthetic_nuclei((64, 64), 4)
    tifffile.imwrite(tmp_path / "a.tif", img)
    before = (tmp_path / "a.tif").read_bytes()
    Image.fromarray(img).save(tmp_path / "b.png")
    line = one_line_error(run("predict", tmp_path / "a.tif", "-o", tmp_path, "-m", model_dir))
    assert "would overwrite the input" in line
    assert (tmp_path / "a.tif").read_bytes() == before
    Image.fromarray(img).save(tmp_path / "a.png")
    line = one_line_error(run("predict", tmp_path / "a.tif", tmp_path / "a.png", "-o", tmp_path / "o",
                              "-m", model_dir))
    assert "both write" in line and not (tmp_path / "o").exists()


# -- rows 4, 5, 9: no code from files, damaged files are one-line errors ----------------------------------------
class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path(os.environ.get("TMPDIR", "/tmp")) / f"pronet-pwned-{os.getpid()}"


@pytest.mark.parametrize("where", ["checkpoint", "weights"])
def test_crafted_pickle_never_runs(tmp_path, where, image_png):
    MARKER.unlink(missing_ok=True)
    mdir = save_model(PRONet(ModelConfig(width=0.0625)), tmp_path / "m")
    if where == "checkpoint":
        (mdir / "train").mkdir()
        with open(mdir / "train" / "checkpoint.pt", "wb") as f:
            pickle.dump({"model": _Evil()}, f)
        with pytest.raises(InputError, match="unreadable checkpoint"):
            load_checkpoint(mdir / "train" / "checkpoint.pt")
        res = run("train", "--images", image_png.parent, "--points", image_png.parent, "-o", mdir, "--resume")
    else:
        cfg = json.loads((mdir / "config.json").read_text())
        cfg.pop("weights_sha256")  # an old-style folder without a checksum still never unpickles code
        (mdir / "config.json").write_text(json.dumps(cfg))
        torch.save({"x": _Evil()}, mdir / "weights.pt")
        res = run("predict", image_png, "-o", tmp_path / "out", "-m", mdir)
    one_line_error(res)
    assert not MARKER.exists()


def test_damaged_weights_fail_checksum(tmp_path, image_png):
    mdir = save_model(PRONet(ModelConfig(width=0.0625)), tmp_path / "m")
    data = bytearray((mdir / "weights.pt").read_bytes())
    mid = len(data) // 2
    data[mid : mid + 1000] = bytes(1000)
    (mdir / "weights.pt").write_bytes(bytes(data))
    line = one_line_error(run("predict", image_png, "-o", tmp_path / "out", "-m", mdir))
    assert "checksum" in line and "weights.pt" in line


def _variants(tmp_path: Path) -> dict[str, Path]:
    base = save_model(PRONet(ModelConfig(width=0.0625)), tmp_path / "base")
    out = {}
    for name in ("width", "pickled", "empty"):
        d = tmp_path / name
        d.mkdir()
        cfg = json.loads((base / "config.json").read_text())
        cfg.pop("weights_sha256")
        if name == "width":
            cfg["width"] = 0.125
            (d / "weights.pt").write_bytes((base / "weights.pt").read_bytes())
        elif name == "pickled":
            torch.save(PRONet(ModelConfig(width=0.0625)), d / "weights.pt")  # a whole pickled module
        else:
            (d / "weights.pt").write_bytes(b"")
        (d / "config.json").write_text(json.dumps(cfg))
        out[name] = d
    return out


def test_bad_model_folders_are_one_line_errors(tmp_path, image_png):
    for name, d in _variants(tmp_path).items():
        with pytest.raises(InputError):
            load_model(d)
        line = one_line_error(run("predict", image_png, "-o", tmp_path / "out", "-m", d))
        assert "weights.pt" in line, (name, line)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated"])
def test_bad_checkpoint_is_one_line_error(tmp_path, image_png, content):
    mdir = tmp_path / "run"
    (mdir / "train").mkdir(parents=True)
    (mdir / "train" / "checkpoint.pt").write_bytes(content)
    line = one_line_error(run("train", "--images", image_png.parent, "--labels", image_png.parent, "-o", mdir,
                              "--resume", "--quiet"))
    assert "checkpoint" in line


# -- row 6: implausible pixel sizes -------------------------------------------------------------------------------
def test_dpi_tiff_asks_for_mpp(tmp_path, model_dir):
    img = np.full((256, 256, 3), 200, np.uint8)
    p = tmp_path / "scan.tif"
    tifffile.imwrite(p, img, resolution=(300, 300), resolutionunit="INCH", photometric="rgb")
    res = run("segment", p, "-o", tmp_path / "out", "-m", model_dir, "--quiet")
    assert res.exit_code == 1 and "--mpp" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "out" / "scan.geojson").exists()
    line = one_line_error(run("segment", p, "-o", tmp_path / "out", "-m", model_dir, "--mpp", 50))
    assert "--mpp" in line
    res = run("segment", p, "-o", tmp_path / "out", "-m", model_dir, "--mpp", 0.06, "--quiet")
    assert res.exit_code == 1 and "too far from the model" in res.output


# -- row 7: damaged part files are redone ------------------------------------------------------------------------
def test_truncated_part_is_redone(tmp_path, model_dir):
    slide = small_slide(tmp_path / "s.tif", side=768, mpp=0.5)
    predictor = Predictor(model_dir, InferenceConfig())
    config = SegmentConfig(tiling=TilingConfig(256, 32), workers=1)
    out = tmp_path / "out"
    seen = []

    def kill_after_three(key):
        seen.append(key)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        segment_slide(slide, out, predictor, config, on_tile_done=kill_after_three)
    parts = sorted((out / ".s.parts").glob("*.npz"))
    assert len(parts) >= 3 and not (out / ".s.lock").exists()
    victim = parts[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(victim).testzip()
    res = segment_slide(slide, out, predictor, config)
    assert res.status == "done" and any(victim.name in w for w in res.warnings)
    fresh = segment_slide(slide, tmp_path / "fresh", predictor, config)
    assert (out / "s.geojson").read_bytes() == (tmp_path / "fresh" / "s.geojson").read_bytes()
    assert fresh.n_nuclei == res.n_nuclei


# -- row 8: no temporary files left ------------------------------------------------------------------------------
def test_temp_files_removed_on_failure_and_swept(tmp_path, model_dir, monkeypatch):
    slide = small_slide(tmp_path / "s.tif", side=512, mpp=0.5)
    predictor = Predictor(model_dir, InferenceConfig())
    config = SegmentConfig(tiling=TilingConfig(256, 32), workers=1)
    out = tmp_path / "out"
    import pronet_wsi.export as export

    def full_disk(tmp, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "commit", full_disk)
    with pytest.raises(OSError):
        segment_slide(slide, out, predictor, config)
    assert not list(out.glob(".*.tmp")) and not (out / "s.geojson").exists()
    monkeypatch.undo()
    orphan = out / ".s.geojson.abc123.tmp"  # as a kill -9 during the final write leaves it
    orphan.write_text("partial")
    res = segment_slide(slide, out, predictor, config)
    assert res.status == "done" and not orphan.exists() and not list(out.glob(".*.tmp"))


# -- row 10 and 11 ----------------------------------------------------------------------------------------------
def test_train_points_outside_suggests_a_real_option(tmp_path):
    img, _, _ = synthetic_nuclei((64, 64), 4)
    Image.fromarray(img).save(tmp_path / "a.png")
    (tmp_path / "a.csv").write_text("x,y\n10,10\n30,30\n500,20\n")
    line = one_line_error(run("train", "--images", tmp_path, "--points", tmp_path, "-o", tmp_path / "m",
                              "--epochs", 1, "--quiet"))
    assert "--drop-outside" in line and "a.csv" in line
    res = CliRunner().invoke(main, ["train", "--help"])
    assert "--drop-outside" in res.output


def test_outputs_honour_umask(tmp_path, model_dir):
    slide = small_slide(tmp_path / "s.tif", side=512, mpp=0.5)
    res = run("segment", slide, "-o", tmp_path / "out", "-m", model_dir, "--tile-px", 256, "--halo-px", 32,
              "--quiet")
    assert res.exit_code == 0, res.output
    files = [p for p in (tmp_path / "out").iterdir() if p.is_file()]
    assert len(files) >= 4
    assert FILE_MODE == 0o666 & ~_umask()
    for p in files:
        assert p.stat().st_mode & 0o777 == FILE_MODE, p


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


# -- the whole list through the CLI ------------------------------------------------------------------------------
def test_bad_inputs_one_line_each(tmp_path, model_dir, image_png):
    slide = small_slide(tmp_path / "s.tif", side=256, mpp=0.5)
    (tmp_path / "empty.svs").write_bytes(b"")
    cases = [
        ["segment", slide, "-o", tmp_path / "o", "-m", model_dir, "--tile-px", 16384, "--batch-size", 64],
        ["segment", slide, "-o", tmp_path / "o", "-m", tmp_path / "nope"],
        ["segment", tmp_path / "missing.svs", "-o", tmp_path / "o", "-m", model_dir, "--quiet"],
        ["predict", image_png, "-o", tmp_path / "o", "-m", model_dir, "--mpp", 300],
        ["predict", image_png, "-o", tmp_path / "o", "-m", model_dir, "--mpp", 0.01],
        ["predict", tmp_path / "missing.png", "-o", tmp_path / "o", "-m", model_dir],
        ["train", "--images", tmp_path / "none", "--labels", tmp_path, "-o", tmp_path / "m"],
    ]
    for args in cases:
        res = run(*args)
        assert res.exit_code not in (0, None), args
        assert "Traceback" not in res.output, args
        lines = [ln for ln in res.output.splitlines() if ln.strip() and not ln.startswith("1 of")]
        assert len(lines) == 1, (args, res.output)


def test_feature_ids_follow_model_and_settings(tmp_path, model_dir):
    """Same slide, model and settings: the same ids (QuPath merges reruns); another model: new ids."""
    import shutil

    slide = small_slide(tmp_path / "s.tif", side=512, mpp=0.5)
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    thr = json.loads((other / "thresholds.json").read_text())
    thr["center_threshold"] = 0.31
    (other / "thresholds.json").write_text(json.dumps(thr))
    ids = []
    for i, m in enumerate((model_dir, model_dir, other)):
        out = tmp_path / f"o{i}"
        res = run("segment", slide, "-o", out, "-m", m, "--tile-px", 256, "--halo-px", 32, "--quiet")
        assert res.exit_code == 0, res.output
        ids.append([f["id"] for f in json.loads((out / "s.geojson").read_text())["features"]])
    assert ids[0] and ids[0] == ids[1]
    assert not set(ids[0]) & set(ids[2])


def test_tissue_annotation_option(tmp_path, model_dir):
    import shapely

    slide = small_slide(tmp_path / "s.tif", side=512, mpp=0.5)
    res = run("segment", slide, "-o", tmp_path / "out", "-m", model_dir, "--tile-px", 256, "--halo-px", 32,
              "--quiet", "--tissue-annotation")
    assert res.exit_code == 0, res.output
    fc = json.loads((tmp_path / "out" / "s_tissue.geojson").read_text())
    (f,) = fc["features"]
    assert f["properties"]["objectType"] == "annotation"
    geom = shapely.geometry.shape(f["geometry"])
    assert geom.is_valid and geom.area > 0.5 * 512 * 512
