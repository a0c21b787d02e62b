"""plan.py: SegmentConfig's checks and derived values, the tissue area, the plan's resume count, the summary."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from wsi_fakes import OracleModel, block_labels, write_oracle_slide

from pronet_wsi.errors import InputError
from pronet_wsi.tiling import TilingConfig
from pronet_wsi.wsi.pipeline import prepare_slide
from pronet_wsi.wsi.plan import Overview, SegmentConfig, SlideResult


@pytest.mark.parametrize("kw, words", [
    (dict(batch_size=0), "batch_size=0: must be between 1 and 256"),
    (dict(batch_size=257), "batch_size=257"),
    (dict(workers=300), "workers=300"),
    (dict(max_features_per_file=-1), "max_features_per_file=-1"),
    (dict(overlay_max_px=10), "overlay_max_px=10"),
    (dict(tiling=TilingConfig(256, 8)), "at least twice the match radius"),
])
def test_bad_settings_are_input_errors_naming_the_setting(kw, words):
    with pytest.raises(InputError, match=words):
        SegmentConfig(**kw)


def test_workers_zero_means_the_cpus_plus_one_at_most_nine(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert SegmentConfig().n_workers == 3 and SegmentConfig(workers=5).n_workers == 5
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    assert SegmentConfig().n_workers == 9


def test_tissue_area_counts_mask_pixels_at_the_thumbnail_scale():
    thumb = np.zeros((100, 100, 3), np.uint8)
    mask = np.zeros((100, 100), bool)
    mask[:50, :40] = True  # 2000 thumbnail px of 8x8 level-0 px at 0.25 um: 2000 * 4 um^2
    assert Overview(thumb, 8.0, mask).tissue_mm2(0.25, (800, 800)) == pytest.approx(2000 * 4 / 1e6)
    assert Overview(thumb, 8.0, None).tissue_mm2(0.25, (800, 800)) == pytest.approx(800 * 800 * 0.0625 / 1e6)


def test_a_plan_counts_the_tiles_an_earlier_run_finished(tmp_path):
    _, labels = block_labels((300, 400), block=150, per_block=10, seed=1)
    slide = write_oracle_slide(tmp_path / "s.tif", labels)
    config = SegmentConfig(tiling=TilingConfig(160, 40), use_tissue_mask=False, batch_size=2)
    plan = prepare_slide(slide, tmp_path / "out", OracleModel(), config)
    try:
        assert plan.n_resumed == 0 and sum(len(b) for b in plan.batches) == len(plan.tiles) > 4
        assert all(len(b) <= 2 for b in plan.batches)  # batch_size tiles per model call
        assert sum(plan.core_mpx.values()) == pytest.approx(300 * 400 / 1e6)  # the cores partition the frame
        assert (tmp_path / "out" / ".s.lock").exists()
    finally:
        plan.release()
    assert not (tmp_path / "out" / ".s.lock").exists()


def test_summary_lines():
    done = SlideResult(Path("a/s.svs"), "done", Path("o/s.geojson"), n_nuclei=12345, n_tiles=8, n_tiles_resumed=3,
                       mpx=20.0, seconds=8.0)
    assert done.summary() == ("s.svs: 12,345 nuclei in 8 tiles (3 resumed), 20.0 Mpx in 8.0 s (2.50 Mpx/s) -> "
                              "o/s.geojson")
    skipped = dataclasses.replace(done, status="skipped")
    assert "skipped" in skipped.summary() and "--overwrite" in skipped.summary()
