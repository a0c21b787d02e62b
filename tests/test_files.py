"""files.py: which outputs pronet-wsi owns (issue 17), one-line OS errors."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time

import pytest
from wsi_fakes import cli_run, small_slide

from pronet_wsi.errors import InputError
from pronet_wsi.export import write_json
from pronet_wsi.files import (
    FILE_MODE,
    OWNED_DIR,
    LockHeld,
    OutputLock,
    atomic_text,
    check_outputs,
    check_report,
    describe_os_error,
    is_owned,
    mark_owned,
)
from pronet_wsi.inference import InferenceConfig, Predictor
from pronet_wsi.tiling import TilingConfig
from pronet_wsi.wsi.pipeline import SegmentConfig, segment_slide


def test_marked_output_is_owned_until_someone_replaces_it(tmp_path):
    out = tmp_path / "a.tif"
    atomic_text(out, "ours")
    assert not is_owned(out)
    mark_owned(out)
    assert is_owned(out) and (tmp_path / OWNED_DIR / "a.tif.json").is_file()
    os.utime(out, ns=(1, 1))  # copied without its times: the checksum still says ours
    assert is_owned(out)
    out.write_text("user's own file")  # same name, other content
    assert not is_owned(out)


def test_run_records_are_recognised_by_content(tmp_path):
    write_json(tmp_path / "s.json", {"status": "done", "name": "s", "slide": {"path": "x"}})
    assert json.loads((tmp_path / "s.json").read_text())["tool"] == "pronet-wsi"
    (tmp_path / OWNED_DIR / "s.json.json").unlink()  # a copied record without its note
    assert is_owned(tmp_path / "s.json")
    (tmp_path / "user.json").write_text('{"slide": "my notes"}')
    assert not is_owned(tmp_path / "user.json")


def test_check_outputs_refuses_inputs_and_foreign_files(tmp_path):
    src = tmp_path / "x.png"
    src.write_bytes(b"img")
    with pytest.raises(InputError, match="overwrite the input"):
        check_outputs([tmp_path / "x.png"], [src], overwrite=True)  # never, not even with --overwrite
    foreign = tmp_path / "x.tif"
    foreign.write_bytes(b"user tiff")
    with pytest.raises(InputError, match=r"x\.tif: exists and was not written by pronet-wsi; pass --overwrite"):
        check_outputs([foreign], [src])
    check_outputs([foreign], [src], overwrite=True)
    check_outputs([tmp_path / "new.tif"], [src])


def test_check_report_accepts_only_its_own_csv(tmp_path):
    ours = tmp_path / "s.csv"
    ours.write_text("a,b\n1,2\n")
    check_report(ours, ("a", "b"))
    other = tmp_path / "gt.tif"
    other.write_bytes(b"II*\x00")
    with pytest.raises(InputError, match="not a CSV report pronet-wsi wrote"):
        check_report(other, ("a", "b"))


def test_os_errors_are_one_line_with_path_and_remedy():
    line = describe_os_error(OSError(errno.ENOSPC, "No space left on device", "/data/out/a.tif"))
    assert line == "/data/out/a.tif: No space left on device; free space there or choose another -o"
    assert "\n" not in describe_os_error(PermissionError(errno.EACCES, "Permission denied", "/x"))


def test_a_write_error_without_a_path_gets_the_output_path(tmp_path):
    from pronet_wsi.files import atomic_write

    def full(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as err:
        atomic_write(tmp_path / "a.tif", full)
    assert err.value.filename == str(tmp_path / "a.tif") and not list(tmp_path.iterdir())


def test_second_run_does_not_harm_first(tmp_path, model_05):
    """Two real processes on one slide: the second waits out (locked) or skips; the first's output survives."""
    slide = small_slide(tmp_path / "s.tif", side=1536, mpp=0.5)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pronet_wsi", "segment", str(slide), "-o", str(out), "-m", str(model_05),
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


def test_temp_files_removed_on_failure_and_swept(tmp_path, model_05, monkeypatch):
    slide = small_slide(tmp_path / "s.tif", side=512, mpp=0.5)
    predictor = Predictor(model_05, InferenceConfig())
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


def test_outputs_honour_umask(tmp_path, model_05):
    slide = small_slide(tmp_path / "s.tif", side=512, mpp=0.5)
    res = cli_run("segment", slide, "-o", tmp_path / "out", "-m", model_05, "--tile-px", 256, "--halo-px", 32,
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
