"""files.py: which outputs pronet-wsi owns (issue 17), one-line OS errors."""

from __future__ import annotations

import errno
import json
import os

import pytest

from pronet_wsi.errors import InputError
from pronet_wsi.export import write_json
from pronet_wsi.files import (
    OWNED_DIR,
    atomic_text,
    check_outputs,
    check_report,
    describe_os_error,
    is_owned,
    mark_owned,
)


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
