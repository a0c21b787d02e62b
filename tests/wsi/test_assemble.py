"""assemble.py: the second pass over finished tiles keeps each nucleus once, numbers them in tile order and
streams them; the same nuclei whatever the tiling (an oracle model sees identical pixels in every tile)."""

import json

import numpy as np
import pytest
from wsi_fakes import OracleModel, block_labels, write_oracle_slide

from pronet_wsi.export import nucleus_uuid, read_geojson
from pronet_wsi.tiling import TilingConfig
from pronet_wsi.wsi.assemble import write_outputs
from pronet_wsi.wsi.pipeline import SegmentConfig, prepare_slide
from pronet_wsi.wsi.tile_store import TileStore
from pronet_wsi.wsi.tile_task import run_batch


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    _, labels = block_labels((500, 600), block=200, per_block=30, seed=7)
    return write_oracle_slide(tmp_path_factory.mktemp("slide") / "slide.tif", labels), int(labels.max())


def _assemble(slide_path, out, tiling: TilingConfig) -> tuple[dict, dict, object]:
    """Tiles run and stored, then write_outputs alone; returns its counts, the GeoJSON and the plan."""
    config = SegmentConfig(tiling=tiling, use_tissue_mask=False, workers=1)
    model = OracleModel()
    plan = prepare_slide(slide_path, out, model, config)
    try:
        for batch in plan.batches:
            run_batch(plan.job, batch, model)
        counts = write_outputs(plan, TileStore(plan.paths.parts), "the-key")
    finally:
        plan.release()
    return counts, read_geojson(plan.paths.geojson), plan


def test_each_nucleus_once_with_ids_in_tile_order(slide, tmp_path):
    slide_path, n_true = slide
    counts, fc, plan = _assemble(slide_path, tmp_path / "a", TilingConfig(160, 40))
    features = fc["features"]
    assert len(plan.tiles) > 9 and counts["nuclei"] == len(features)
    assert counts["candidates"] - counts["duplicates_removed"] == counts["nuclei"]
    assert counts["duplicates_removed"] > 0  # the halos saw nuclei twice
    assert abs(counts["nuclei"] - n_true) <= 0.02 * n_true  # the oracle's nuclei, none lost or doubled
    assert [f["id"] for f in features] == [nucleus_uuid("the-key", i) for i in range(1, len(features) + 1)]
    areas = [f["properties"]["measurements"]["Area µm^2"] for f in features]
    assert counts["area_um2_sum"] == pytest.approx(sum(areas), rel=1e-3)
    centres = np.array([np.mean(f["geometry"]["coordinates"][0], axis=0) for f in features])
    gaps = np.linalg.norm(centres[:, None] - centres[None], axis=-1) + np.eye(len(centres)) * 1e9
    assert gaps.min() > 2.0  # no nucleus kept from two tiles


def test_the_same_nuclei_whatever_the_tiling(slide, tmp_path):
    slide_path, _ = slide
    results = [_assemble(slide_path, tmp_path / f"t{tile}", TilingConfig(tile, halo))[1]
               for tile, halo in ((160, 40), (256, 48), (640, 48))]
    shapes = [sorted(json.dumps(f["geometry"]["coordinates"]) for f in fc["features"]) for fc in results]
    assert shapes[0] == shapes[1] == shapes[2]
