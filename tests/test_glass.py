"""Tiles cut to the tissue's bounding box: the geometry, and the same nuclei with and without the cut."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from wsi_fakes import DarkBlobModel

from pronet_wsi.export import read_geojson
from pronet_wsi.geometry import Box, Frame
from pronet_wsi.glass import crop_read, crop_to_tissue, tissue_bbox
from pronet_wsi.slide import write_pyramid_tiff
from pronet_wsi.tiling import Tile, TileGrid, TilingConfig
from pronet_wsi.wsi.pipeline import SegmentConfig, segment_slide


def test_crop_read_snaps_to_stride_from_the_read_corner_and_keeps_margin():
    tile = Tile((0, 1), core=Box(200, 0, 400, 200), read=Box(152, -48, 448, 248))
    cut = crop_read(tile, Box(370.5, 10, 700, 30), margin_px=48)
    r = cut.read
    assert cut.core == tile.core and cut.index == tile.index
    assert (r.x0 - 152) % 16 == 0 and (r.y0 + 48) % 16 == 0  # the full tile's pooling grid
    assert r.x0 <= 370.5 - 48 and r.x0 > 370.5 - 48 - 16 and r.x1 == 448  # widened by the margin, clipped
    assert r.y0 == -48 and r.y1 >= 30 + 48 and (r.y1 + 48) % 16 == 0
    assert r.area < tile.read.area


def test_tissue_bbox_in_processing_px_and_tiles_without_glass_stay_whole():
    frame = Frame.for_slide((1024, 1024), 0.25, 0.5)  # processing px = 2 level-0 px
    mask = np.zeros((64, 64), bool)  # one mask px = 16 level-0 px = 8 processing px
    mask[10:20, 30:40] = True
    assert tissue_bbox(Box(0, 0, 512, 512), frame, mask, 16.0) == Box(240, 80, 320, 160)
    assert tissue_bbox(Box(0, 0, 100, 40), frame, mask, 16.0) is None
    grid = TileGrid(frame.shape, TilingConfig(256, 48))
    tiles = list(grid)
    full = crop_to_tissue(tiles, frame, np.ones((64, 64), bool), 16.0, 48)
    assert full == tiles
    cut = crop_to_tissue(tiles, frame, mask, 16.0, 48)
    assert sum(t.read.area for t in cut) < sum(t.read.area for t in tiles)
    assert all(c.core == t.core for c, t in zip(cut, tiles, strict=True))


def _glass_slide(path: Path) -> tuple[Path, int]:
    """1536 px at 0.5 um/px: a pink tissue disk off-centre on glass, with dark nuclei inside it."""
    h = w = 1536
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    img = np.empty((h, w, 3), np.uint8)
    img[:] = (244, 242, 245)
    img[(xx - 600) ** 2 + (yy - 700) ** 2 <= 420**2] = (230, 170, 205)
    rng = np.random.default_rng(3)
    ang, rad = rng.uniform(0, 2 * np.pi, 80), 380 * np.sqrt(rng.uniform(0, 1, 80))
    for x, y in zip(600 + rad * np.cos(ang), 700 + rad * np.sin(ang), strict=True):
        img[(xx - x) ** 2 + (yy - y) ** 2 <= 36] = (60, 30, 100)
    write_pyramid_tiff(path, img, 0.5, tile_px=128, levels=3, compression="zlib")
    return path, 80


def _features(res) -> list:
    return sorted((f["geometry"]["coordinates"][0][:3], f["properties"].get("measurements", {}).get("Area µm^2"))
                  for f in read_geojson(res.geojson)["features"])


def test_same_nuclei_with_and_without_cropping(tmp_path):
    slide, _ = _glass_slide(tmp_path / "glass.tif")
    base = SegmentConfig(tiling=TilingConfig(256, 48), batch_size=3, workers=2)
    runs = {}
    for crop in (False, True):
        cfg = SegmentConfig(**{**base.__dict__, "crop_glass": crop})
        runs[crop] = segment_slide(slide, tmp_path / f"crop{crop}", DarkBlobModel(0.5), cfg)
    assert runs[False].n_nuclei > 40
    assert _features(runs[True]) == _features(runs[False])
    records = {c: json.loads(r.geojson.with_name("glass.json").read_text()) for c, r in runs.items()}
    assert records[True]["model_input_mpx"] < 0.95 * records[False]["model_input_mpx"]  # 2.67 vs 2.95 Mpx


def test_shipped_model_same_nuclei_with_and_without_cropping_on_demo_slide(tmp_path):
    from pronet_wsi.inference import InferenceConfig, Predictor
    from pronet_wsi.model import default_model_dir

    demo = Path(__file__).resolve().parents[1] / "examples" / "demo_slide.tif"
    if not demo.exists() or default_model_dir() is None:
        pytest.skip("examples/demo_slide.tif or the shipped model is absent")
    shutil.copy(demo, tmp_path / demo.name)
    predictor = Predictor(None, InferenceConfig(device="cpu", amp="off", batch_size=2))
    base = SegmentConfig(tiling=TilingConfig(512, predictor.context_px), batch_size=2)
    cents, mpx = {}, {}
    for crop in (False, True):
        res = segment_slide(tmp_path / demo.name, tmp_path / f"crop{crop}", predictor,
                            SegmentConfig(**{**base.__dict__, "crop_glass": crop}))
        feats = read_geojson(res.geojson)["features"]
        cents[crop] = np.array([np.mean(f["geometry"]["coordinates"][0], axis=0) for f in feats])
        mpx[crop] = json.loads(res.geojson.with_name("demo_slide.json").read_text())["model_input_mpx"]
    a, b = cents[False], cents[True]
    assert len(a) > 100 and abs(len(a) - len(b)) <= 0.005 * len(a)
    d = np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1)).min(axis=1)
    assert (d < 1.0).mean() >= 0.99, f"{(d >= 1.0).sum()} of {len(a)} nuclei moved by >= 1 px"
    assert mpx[True] < mpx[False]
