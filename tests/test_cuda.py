"""The shipped model on a CUDA GPU: the CPU's nuclei, batch-size independent maps, seam-exact tiling.

Skipped without CUDA (CI has none); ``benchmarks/gpu_checks.sh`` runs them on a GPU machine. No ../shared data:
the images are synthetic (a GPU machine gets the repository only). The ``check_*`` functions take the device, so
the same checks run on a CPU too (``check_*("cpu", ...)``: how they were tried without a GPU).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_stitching import seam_report

from pronet_wsi.export import read_geojson
from pronet_wsi.inference import InferenceConfig, Predictor
from pronet_wsi.metrics import aji, overlap_table
from pronet_wsi.model import default_model_dir
from pronet_wsi.postprocess import postprocess
from pronet_wsi.slide import write_pyramid_tiff
from pronet_wsi.synthetic import synthetic_nuclei
from pronet_wsi.tiling import TileGrid, TilingConfig
from pronet_wsi.wsi.pipeline import SegmentConfig, segment_slide

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(default_model_dir() is None, reason="no shipped model in models/"),
]


def nuclei_image(side: int, seed: int = 0) -> np.ndarray:
    """(side, side, 3) uint8: synthetic nuclei at about a real tissue's density (~900 per Mpx)."""
    return synthetic_nuclei((side, side), n_nuclei=int(side * side * 9e-4), seed=seed)[0]


def check_maps_and_nuclei_match_the_cpu(device: str, amp: str) -> dict[str, float]:
    """The device's maps and nuclei against the CPU's PyTorch fp32 on one image: max map differences, AJI."""
    image = nuclei_image(768)
    cpu = Predictor(None, InferenceConfig(device="cpu", runtime="torch", amp="off", window_px=1024))
    dev = Predictor(None, InferenceConfig(device=device, runtime="torch", amp=amp, window_px=1024))
    a, b = cpu.predict_image(image), dev.predict_image(image)
    ref = postprocess(a, cpu.postprocess_config).labels
    got = postprocess(b, dev.postprocess_config).labels
    return {"d_foreground": float(np.abs(a["foreground"] - b["foreground"]).max()),
            "d_offsets_px": float(np.abs(a["offsets"] - b["offsets"]).max()),
            "d_centers": float(np.abs(a["centers"] - b["centers"]).max()),
            "aji": aji(overlap_table(ref, got)), "n_cpu": int(ref.max()), "n_device": int(got.max())}


def check_batches_match_single_tiles(device: str, amp: str, batch: int = 8) -> float:
    """Max foreground difference between ``batch`` tiles run together and each tile run alone."""
    predictor = Predictor(None, InferenceConfig(device=device, runtime="torch", amp=amp))
    tiles = np.stack([nuclei_image(256, seed=s) for s in range(batch)])
    together = predictor.predict_batch(tiles)["foreground"]
    alone = np.concatenate([predictor.predict_batch(t[None])["foreground"] for t in tiles])
    return float(np.abs(together - alone).max())


def check_tiled_matches_untiled(device: str, amp: str, tmp_path, tile_px: int = 1024) -> dict:
    """``segment_slide`` on a 2048 px synthetic slide in ``tile_px`` tiles against one untiled pass (the
    seam report of tests/test_stitching.py: AJI, nuclei near seams, lost, doubled)."""
    region = nuclei_image(2048, seed=3)
    predictor = Predictor(None, InferenceConfig(device=device, runtime="torch", amp=amp, batch_size=4,
                                                window_px=2048 + 4 * 160 + 128))
    halo = predictor.context_px
    path = tmp_path / "region.tif"
    write_pyramid_tiff(path, region, predictor.mpp, tile_px=256, levels=2, compression="zlib")
    pad = ((halo, halo), (halo, halo), (0, 0))
    maps = predictor.predict_image(np.pad(region, pad, constant_values=255))
    core = (slice(halo, halo + region.shape[0]), slice(halo, halo + region.shape[1]))
    maps = {k: v[(slice(None), *core)] if v.ndim == 3 else v[core] for k, v in maps.items()}
    untiled = postprocess(maps, predictor.postprocess_config).labels
    cfg = SegmentConfig(tiling=TilingConfig(tile_px, halo), use_tissue_mask=False, labels_zarr=True, batch_size=4)
    res = segment_slide(path, tmp_path / "out", predictor, cfg)
    import zarr

    tiled = np.asarray(zarr.open_array(str(tmp_path / "out" / "region_labels.zarr"))[:])
    grid = TileGrid(region.shape[:2], cfg.tiling, predictor.stride)
    seams_x = sorted({t.core.x0 for t in grid} - {0})
    seams_y = sorted({t.core.y0 for t in grid} - {0})
    return seam_report(untiled, tiled, read_geojson(res.geojson)["features"], seams_x, seams_y)


@pytest.mark.parametrize("amp", ["off", "on"])
def test_cuda_nuclei_match_the_cpu(amp):
    """fp32 (TF32 convolutions) and fp16 on the GPU find the CPU fp32 nuclei."""
    r = check_maps_and_nuclei_match_the_cpu("cuda", amp)
    print(f"amp {amp}: {r}")  # the RESULTS.md row (pytest -s)
    assert r["n_cpu"] > 200
    assert r["aji"] >= (0.99 if amp == "off" else 0.97), r
    assert abs(r["n_device"] - r["n_cpu"]) <= 0.02 * r["n_cpu"], r


@pytest.mark.parametrize("amp", ["off", "on"])
def test_cuda_batches_match_single_tiles(amp):
    d = check_batches_match_single_tiles("cuda", amp)
    print(f"amp {amp}: max |d foreground| batch 8 vs 1: {d:.2e}")
    assert d <= (1e-3 if amp == "off" else 2e-2)


def test_cuda_tiling_is_seam_exact(tmp_path):
    """fp16, as `segment` runs on a GPU: nothing lost or doubled at the seams of 1024 px tiles."""
    report = check_tiled_matches_untiled("cuda", "on", tmp_path)
    print(f"cuda fp16, tile 1024: {report}")
    assert report["near_seams"] > 50
    assert report["aji"] >= 0.98, report
    assert report["lost"] == 0 and report["duplicated"] == 0, report
