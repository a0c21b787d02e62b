"""tile_store.py: per-tile parts round-trip exactly, a changed fingerprint empties the store and says why, a
damaged part is found, deleted and redone."""

import zipfile

import numpy as np
import pytest
from wsi_fakes import small_slide

from pronet_wsi.geometry import Box, Frame
from pronet_wsi.inference import InferenceConfig, Predictor
from pronet_wsi.instances import tile_instances
from pronet_wsi.postprocess import Segmentation
from pronet_wsi.synthetic import synthetic_nuclei
from pronet_wsi.tiling import TilingConfig
from pronet_wsi.wsi.pipeline import SegmentConfig, segment_slide
from pronet_wsi.wsi.tile_store import TileStore


@pytest.fixture
def inst():
    _, lab, centers = synthetic_nuclei((160, 160), n_nuclei=20, seed=3)
    frame = Frame(0.5, (160, 160), (80, 80))
    seg = Segmentation(lab.astype(np.uint32), centers, np.full(len(centers), 0.8, np.float32))
    return tile_instances(seg, (lab > 0).astype(np.float32), Box(0, 0, 160, 160), Box(0, 0, 160, 160), frame, 0.5,
                          8.0)


def test_a_part_round_trips_exactly(tmp_path, inst):
    store = TileStore(tmp_path / "parts", {"slide": "s", "model": "m"})
    bodies = [f'{{"n": {i}, "name": "nucléus"}}' for i in range(len(inst))]
    store.save("r0_c1", inst, bodies, {"key": "r0_c1", "cut_at_edge": 2})
    assert store.done() == {"r0_c1"} and store.done(verify=True) == {"r0_c1"}
    back = store.load("r0_c1", masks=True)
    for field in ("centers_xy", "priority", "in_core", "area_px", "coords", "offsets", "bbox", "bits"):
        np.testing.assert_array_equal(getattr(back, field), getattr(inst, field), err_msg=field)
    assert store.load_texts("r0_c1") == bodies and store.load_stats("r0_c1")["cut_at_edge"] == 2
    centers, priority, coords, offsets = store.load_candidates("r0_c1")
    np.testing.assert_array_equal(centers, inst.centers_xy)
    np.testing.assert_array_equal(coords, inst.coords)
    assert len(inst) > 5


def test_a_changed_fingerprint_empties_the_store_and_names_what_changed(tmp_path, inst):
    TileStore(tmp_path / "parts", {"slide": "s", "model": "m", "tiling": 256}).save("r0_c0", inst, [], {})
    same = TileStore(tmp_path / "parts", {"slide": "s", "model": "m", "tiling": 256})
    assert same.done() == {"r0_c0"} and same.restarted == ""
    other = TileStore(tmp_path / "parts", {"slide": "s", "model": "m2", "tiling": 512})
    assert other.done() == set() and other.restarted == "settings (model, tiling)"
    assert TileStore(tmp_path / "parts").done() == set()  # a tile task opens it as it is


def test_a_damaged_part_is_deleted_and_listed(tmp_path, inst):
    store = TileStore(tmp_path / "parts", {"slide": "s"})
    store.save("a", inst, [], {})
    store.save("b", inst, [], {})
    data = store.path("b").read_bytes()
    store.path("b").write_bytes(data[: len(data) // 2])
    assert store.done() == {"a", "b"}  # unverified: listed by name
    assert store.done(verify=True) == {"a"} and store.damaged == [store.path("b")] and not store.path("b").exists()


def test_truncated_part_is_redone(tmp_path, model_05):
    slide = small_slide(tmp_path / "s.tif", side=768, mpp=0.5)
    predictor = Predictor(model_05, InferenceConfig())
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
