"""Bad input is one line; a bug is one line naming its type with the -v hint, and -v prints the traceback."""

import json

import pytest
from click.testing import CliRunner
from wsi_fakes import cli_run, small_slide, tiny_model_dir

import pronet_wsi.evaluation
import pronet_wsi.wsi.cohort
from pronet_wsi.cli import main


def _shape_bug(*args, **kwargs):
    raise IndexError("index 7 is out of bounds for axis 0 with size 3")


@pytest.fixture
def folders(tmp_path):
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    return str(tmp_path / "pred"), str(tmp_path / "gt")


def test_an_internal_bug_is_one_line_with_the_hint(folders, monkeypatch):
    monkeypatch.setattr(pronet_wsi.evaluation, "evaluate_folder", _shape_bug)
    res = CliRunner().invoke(main, ["evaluate", *folders])
    assert res.exit_code == 1
    assert "internal error IndexError: index 7 is out of bounds" in res.output
    assert "run with -v for the traceback" in res.output
    assert "Traceback" not in res.output


def test_verbose_prints_the_traceback_of_a_bug(folders, monkeypatch):
    monkeypatch.setattr(pronet_wsi.evaluation, "evaluate_folder", _shape_bug)
    res = CliRunner().invoke(main, ["-v", "evaluate", *folders])
    assert res.exit_code == 1
    assert "Traceback (most recent call last)" in res.output
    assert "_shape_bug" in res.output  # the frame that raised
    assert "internal error IndexError" in res.output


def test_a_plain_value_error_is_a_bug_not_bad_input(folders, monkeypatch):
    def bug(*args, **kwargs):
        raise ValueError("operands could not be broadcast together with shapes (3,) (4,)")

    monkeypatch.setattr(pronet_wsi.evaluation, "evaluate_folder", bug)
    res = CliRunner().invoke(main, ["evaluate", *folders])
    assert res.exit_code == 1
    assert "internal error ValueError" in res.output and "run with -v" in res.output


def test_bad_input_stays_one_line_without_the_hint(tmp_path):
    res = CliRunner().invoke(main, ["evaluate", str(tmp_path / "missing"), str(tmp_path / "missing_gt")])
    assert res.exit_code == 1
    assert res.output.startswith("Error: ") and "run with -v" not in res.output
    assert "internal error" not in res.output and "Traceback" not in res.output


def test_bad_config_values_are_input_errors(tmp_path):
    res = CliRunner().invoke(main, ["pseudo-labels", str(tmp_path / "a.png"), str(tmp_path / "a.csv"), "-o",
                                    str(tmp_path / "out"), "--lam", "3"])
    assert res.exit_code == 1 and "lam=3" in res.output and "internal error" not in res.output


def test_info_is_inside_the_error_wrapper(monkeypatch):
    import pronet_wsi.model

    monkeypatch.setattr(pronet_wsi.model, "default_model_dir", _shape_bug)
    res = CliRunner().invoke(main, ["info"])
    assert res.exit_code == 1 and "internal error IndexError" in res.output and "run with -v" in res.output


def test_a_failed_slide_records_the_exception_type(tmp_path, monkeypatch):
    model = tiny_model_dir(tmp_path / "model")
    slide = small_slide(tmp_path / "s.tif")
    monkeypatch.setattr(pronet_wsi.wsi.cohort, "segment_slide", _shape_bug)
    res = CliRunner().invoke(main, ["segment", str(slide), "-o", str(tmp_path / "out"), "-m", str(model),
                                    "--tile-px", "256", "--halo-px", "32", "--quiet"])
    assert res.exit_code == 1
    assert "internal error IndexError" in res.output and "run with -v" in res.output
    record = json.loads((tmp_path / "out" / "s.json").read_text())
    assert record["status"] == "failed" and record["error_type"] == "IndexError"


def test_interrupt_promises_resume_only_where_it_exists(folders, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pronet_wsi.evaluation, "evaluate_folder", interrupted)
    res = CliRunner().invoke(main, ["evaluate", *folders])
    assert res.exit_code == 130 and "interrupted" in res.output and "resume" not in res.output
    from pronet_wsi.cli import INTERRUPTED

    assert "run the same command again to resume" in INTERRUPTED["segment"] and "--resume" in INTERRUPTED["train"]


def test_bad_inputs_one_line_each(tmp_path, model_05, image_png):
    slide = small_slide(tmp_path / "s.tif", side=256, mpp=0.5)
    (tmp_path / "empty.svs").write_bytes(b"")
    cases = [
        ["segment", slide, "-o", tmp_path / "o", "-m", model_05, "--tile-px", 16384, "--batch-size", 64],
        ["segment", slide, "-o", tmp_path / "o", "-m", tmp_path / "nope"],
        ["segment", tmp_path / "missing.svs", "-o", tmp_path / "o", "-m", model_05, "--quiet"],
        ["predict", image_png, "-o", tmp_path / "o", "-m", model_05, "--mpp", 300],
        ["predict", image_png, "-o", tmp_path / "o", "-m", model_05, "--mpp", 0.01],
        ["predict", tmp_path / "missing.png", "-o", tmp_path / "o", "-m", model_05],
        ["train", "--images", tmp_path / "none", "--labels", tmp_path, "-o", tmp_path / "m"],
    ]
    for args in cases:
        res = cli_run(*args)
        assert res.exit_code not in (0, None), args
        assert "Traceback" not in res.output, args
        lines = [ln for ln in res.output.splitlines() if ln.strip() and not ln.startswith("1 of")]
        assert len(lines) == 1, (args, res.output)
