"""Whole-slide segmentation benchmark: end-to-end time vs. model-forward-only time, Mpx/s, peak RSS.

    python -m benchmarks.wsi                               # 0.27 Gpx and 1.07 Gpx slides, shipped model or width 0.25
    python -m benchmarks.wsi --sizes 16384 --width 0.25    # one size, a random width-0.25 PRONet
    python -m benchmarks.wsi --sizes 16384 --full-tissue   # tissue everywhere: the tiling's own overhead
    python -m benchmarks.wsi --sizes 8192 --compare --sample 0   # today's path vs the new one, same run
    python -m benchmarks.wsi --sizes 8192 --compare --sample 0 --amp off   # both in fp32 (a CPU without bf16)

``--compare`` runs each slide twice: "today" (PyTorch forward, tiles not cut to the tissue) and "new" (``--runtime``,
default auto = OpenVINO when installed, tiles cut to the tissue) and prints seconds per mm² of tissue with the
stage breakdown (``--baseline-model DIR``: "today" runs that model folder, e.g. the model shipped before).
``--runtime`` / ``--no-crop-glass`` pick one path without ``--compare``. ``--int8 N`` adds (or with
``--compare``, adds a third) run whose OpenVINO graph is NNCF's INT8 of the model, calibrated on N random training
crops per lab (``benchmarks/int8.py``; needs ``pip install nncf`` and ../shared/data; its calibration is counted as
model setup).

Tile and batch default to the package's (``TilingConfig``, ``SegmentConfig``), the halo to each model's
``context_px`` (as ``segment``). "e2e / core forward" compares the whole run with the model's forward on the
tiles' cores alone (the same tiles cropped to their cores, timed the same way): what halos, reading,
post-processing, stitching and export cost on top of the pixels kept.

For each size it writes (once, cached in --workdir) a pyramidal JPEG TIFF at 0.25 um/px tiled from a few synthetic
1024 px tissue blocks inside an elliptical tissue region on glass, then:

* **end to end**: ``segment_slide`` in a fresh subprocess (tissue mask, reading, model, post-processing,
  stitching, GeoJSON); its wall time and its peak RSS (``ru_maxrss``);
* **forward only**: ``predict_batch`` alone (same process, after the run, from a worker thread as in the
  pipeline) on a sample of the same tissue tiles (read beforehand, not timed): the median batch time scaled to
  the number of tiles the run processed (the forward cost does not depend on the pixels);
* **post-processing at a realistic density**: a random network calls (almost) no nuclei, so the per-tile cost of
  ``postprocess`` + polygons + GeoJSON text is also measured on maps made from the dark blobs of the same tiles.

The ratio end-to-end / forward-only is the pipeline's overhead over the model (target <= 1.25).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.record import ROOT, banner

BLOCK = 1024


def make_slide(path: Path, side: int, seed: int = 0, n_blocks: int = 4, full_tissue: bool = False,
               mpp: float = 0.25) -> Path:
    """A ``side`` x ``side`` pyramidal JPEG TIFF mosaic of synthetic tissue blocks (in an ellipse on glass, or
    everywhere with ``full_tissue``), drawn at 0.25 um/px and recorded as ``mpp`` (e.g. 0.2527, an Aperio 40x
    scan: the slide is then read resampled, and outlines are snapped to the 0.01 px grid, as on real slides)."""
    import importlib.util

    from pronet_wsi.slide import _halve, write_pyramid_tiff

    spec = importlib.util.spec_from_file_location("make_demo_slide", ROOT / "examples" / "make_demo_slide.py")
    assert spec is not None and spec.loader is not None
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)  # the demo slide's synthetic tissue, from the example script itself
    demo_image = demo.demo_image

    blocks = [demo_image(BLOCK, seed=seed + k, glass=False) for k in range(n_blocks)]
    glass = np.full((BLOCK, BLOCK, 3), (244, 242, 245), np.uint8)
    pyramids = []
    for b in [*blocks, glass]:
        levels = [b]
        while levels[-1].shape[0] > 1:
            levels.append(_halve(levels[-1]))
        pyramids.append(levels)
    nb = side // BLOCK
    rng = np.random.default_rng(seed)
    yy, xx = (np.mgrid[0:nb, 0:nb] + 0.5) / nb - 0.5
    inside = ((yy / 0.45) ** 2 + (xx / 0.42) ** 2 <= 1.0) | full_tissue
    ids = np.where(inside, rng.integers(0, n_blocks, (nb, nb)), n_blocks)
    tile = 256

    def tile_at(level: int, row: int, col: int) -> np.ndarray:
        b = BLOCK >> level
        y0, x0 = row * tile, col * tile
        if b >= tile:
            return pyramids[ids[y0 // b, x0 // b]][level][y0 % b : y0 % b + tile, x0 % b : x0 % b + tile]
        out = np.empty((tile, tile, 3), np.uint8)
        for i in range(tile // b):
            for j in range(tile // b):
                out[i * b : (i + 1) * b, j * b : (j + 1) * b] = pyramids[ids[y0 // b + i, x0 // b + j]][level]
        return out

    levels = 1
    while side >> levels >= 1024:
        levels += 1
    tmp = path.with_suffix(".tmp.tif")
    write_pyramid_tiff(tmp, tile_at, mpp, tile_px=tile, levels=levels, compression="jpeg", quality=80,
                       shape=(side, side), maxworkers=2)
    os.replace(tmp, path)
    return path


def model_dir(args, workdir: Path) -> Path:
    from pronet_wsi.model import default_model_dir

    if args.model:
        return Path(args.model)
    if args.width is None and default_model_dir() is not None:
        return default_model_dir()
    import torch

    from pronet_wsi.model import ModelConfig, PRONet, save_model

    width = args.width or 0.25
    path = workdir / f"random-width{width:g}"
    if not (path / "weights.pt").exists():
        torch.manual_seed(0)
        save_model(PRONet(ModelConfig(width=width, mpp=0.25)).eval(), path)
    return path


def int8_forward(predictor, n_per_lab: int, threads: int):
    """The predictor's OpenVINO forward with NNCF's INT8 graph of its model (calibrated on ``n_per_lab`` random
    512 px training crops of each lab), the other operations in bf16 where the predictor runs bf16."""
    import nncf

    from benchmarks.int8 import calibration_tiles
    from pronet_wsi.runtime import OpenVINOForward, openvino_graph

    if predictor.runtime != "openvino":
        raise SystemExit("--int8 needs the OpenVINO runtime (pip install 'pronet-wsi[fast]')")
    model, cfg = predictor.model.eval(), predictor.bundle.config
    tiles = calibration_tiles(n_per_lab)
    graph = nncf.quantize(openvino_graph(model, cfg.mean, cfg.std), nncf.Dataset(tiles), subset_size=len(tiles))
    return OpenVINOForward(model, cfg.mean, cfg.std, predictor.autocast_dtype is not None, threads=threads,
                           streams=predictor.concurrency, graph=graph)


def run_child(args) -> None:
    """Subprocess: one end-to-end run; prints a JSON line with the run record and the peak RSS."""
    from pronet_wsi.inference import InferenceConfig, Predictor
    from pronet_wsi.tiling import TilingConfig
    from pronet_wsi.wsi.pipeline import SegmentConfig, segment_slide

    t = time.perf_counter()
    predictor = Predictor(args.model, InferenceConfig(device=args.device, batch_size=args.batch_size,
                                                      runtime=args.runtime, threads=args.threads,
                                                      streams=args.streams, amp=args.amp))
    if args.int8:
        predictor._fast = int8_forward(predictor, args.int8, args.threads)
        predictor.int8_graph = "calibrated-in-this-run"  # not the model folder's graph
    setup_s = time.perf_counter() - t
    if args.halo_px is None:
        args.halo_px = predictor.context_px  # as `segment` does
    cfg = SegmentConfig(tiling=TilingConfig(args.tile_px, args.halo_px), batch_size=args.batch_size,
                        workers=args.workers, overwrite=True, measure=measure_config(args), parquet=args.parquet,
                        crop_glass=not args.no_crop_glass)
    t = time.perf_counter()
    res = segment_slide(args.slide, args.out, predictor, cfg)
    wall = time.perf_counter() - t
    record = json.loads((Path(args.out) / (Path(args.slide).stem + ".json")).read_text())
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    fwd = forward_and_postprocess(args, predictor, Path(args.slide), record["counts"]["tiles_run"]) if args.sample \
        else {"forward_s": float("nan"), "core_forward_s": float("nan"), "read_hw": [0, 0],
              "pp_ms_per_tile": float("nan"), "pp_nuclei_per_tile": float("nan")}
    device = str(predictor.device)
    if predictor.device.type == "cuda":
        import torch

        device += f" {torch.cuda.get_device_name(predictor.device)}"
    runtime = predictor.runtime + (" int8" if getattr(predictor, "int8_graph", None) else "")
    print(json.dumps({"wall_s": wall, "setup_s": setup_s, "runtime": runtime, "device": device,
                      "nuclei": res.n_nuclei,
                      "record": record, "peak_rss_mb": rss_mb, **fwd}))


def measure_config(args):
    from pronet_wsi.measurements import MeasureConfig

    return MeasureConfig(args.measurements, args.cells)


def forward_and_postprocess(args, predictor, slide_path: Path, n_tiles: int) -> dict:
    """Forward-only seconds for ``n_tiles`` (median batch time of a sample of the same tissue tiles) and the
    post-processing ms per tile on realistic maps."""
    from scipy import ndimage as ndi

    from pronet_wsi.export import feature_bodies
    from pronet_wsi.geometry import Frame
    from pronet_wsi.instances import tile_instances
    from pronet_wsi.postprocess import postprocess
    from pronet_wsi.slide import open_slide
    from pronet_wsi.tiling import TileGrid, TilingConfig, select_tiles
    from pronet_wsi.tissue import tissue_mask
    from pronet_wsi.training.targets import encode_maps

    with open_slide(slide_path) as slide:
        frame = Frame.for_slide(slide.shape, slide.mpp, predictor.mpp)
        thumb, ds = slide.thumbnail(2048)
        grid = TileGrid(frame.shape, TilingConfig(args.tile_px, args.halo_px), predictor.stride)
        tiles = select_tiles(grid, frame, tissue_mask(thumb, ds * slide.mpp), ds)
        step = max(1, len(tiles) // args.sample)
        sample = tiles[::step][: args.sample]
        images = np.stack([slide.read_box(frame.box_to_level0(t.read), t.read.shape) for t in sample])
    bs = min(args.batch_size, len(images))
    h = args.halo_px
    ch, cw = grid.core_hw
    cores = np.ascontiguousarray(images[:, h : h + ch, h : h + cw])  # the same tiles without their halo

    def timed(batches: np.ndarray) -> float:
        times: list[float] = []

        def forward() -> None:  # in a worker thread, as the pipeline calls the model
            for i in range(0, len(batches) - bs + 1, bs):
                t = time.perf_counter()
                predictor.predict_batch(batches[i : i + bs])
                times.append(time.perf_counter() - t)

        worker = threading.Thread(target=forward)
        worker.start()
        worker.join()
        return float(np.median(times)) / bs

    per_tile = timed(images)
    per_core = timed(cores)
    pp_ms, nuclei = [], []
    for img, tile in zip(images, sample, strict=True):
        lab, _ = ndi.label(ndi.binary_opening(img.mean(axis=2) < 140, iterations=1))
        m = encode_maps(lab.astype(np.uint32), radius_px=8)
        t = time.perf_counter()
        seg = postprocess(m, predictor.postprocess_config)
        inst = tile_instances(seg, m["foreground"], tile.read, tile.core, frame, predictor.mpp, 8.0, image=img,
                              measure=measure_config(args))
        feature_bodies(inst)
        pp_ms.append((time.perf_counter() - t) * 1e3)
        nuclei.append(int(inst.in_core.sum()))
    return {"forward_s_per_tile": per_tile, "forward_s": per_tile * n_tiles, "core_forward_s": per_core * n_tiles,
            "read_hw": list(grid.read_hw), "core_hw": list(grid.core_hw), "sample": len(images),
            "pp_ms_per_tile": float(np.median(pp_ms)), "pp_nuclei_per_tile": float(np.median(nuclei))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16384, 32768], help="slide sides in px")
    parser.add_argument("--model", default=None, help="model folder (default: shipped, else random)")
    parser.add_argument("--width", type=float, default=None, help="use a random PRONet of this width")
    parser.add_argument("--tile-px", type=int, default=None, help="default: TilingConfig's")
    parser.add_argument("--baseline-tile-px", type=int, default=2048,
                        help="with --compare: the 'today' run's tile (the issue's baseline: 2048)")
    parser.add_argument("--halo-px", type=int, default=None, help="default: each model's context_px (as segment)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: SegmentConfig's")
    parser.add_argument("--full-tissue", action="store_true", help="tissue everywhere (no glass around it)")
    parser.add_argument("--slide-mpp", type=float, default=0.25,
                        help="pixel size the slide records (0.2527: an Aperio 40x scan, read resampled)")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--sample", type=int, default=16, help="tiles timed for forward-only")
    parser.add_argument("--workdir", default="/tmp/pronet-wsi-bench")
    parser.add_argument("--cells", type=float, default=0.0, help="segment --cells UM (0 = no cells)")
    parser.add_argument("--measurements", default="all", choices=["none", "basic", "all"])
    parser.add_argument("--parquet", action="store_true", help="also write the nuclei Parquet table")
    parser.add_argument("--smoke", action="store_true",
                        help="one 1024 px slide, a random width-1/16 network, 544 px tiles (does it run?)")
    parser.add_argument("--runtime", default="auto", choices=["auto", "torch", "openvino"],
                        help="the forward's engine (the new path's with --compare)")
    parser.add_argument("--threads", type=int, default=0, help="OpenVINO threads (0 = all cores)")
    parser.add_argument("--streams", type=int, default=0,
                        help="OpenVINO forwards at once (0 = auto, as segment; 1 = one forward on all threads)")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA when present), cpu, cuda or cuda:N; CUDA always runs PyTorch (fp16 with --amp "
                             "auto or on)")
    parser.add_argument("--amp", default="auto", choices=["auto", "on", "off"],
                        help="bf16 on a CPU (auto: where the CPU has it); off = fp32 for both paths, as on a CPU "
                             "without bf16")
    parser.add_argument("--no-crop-glass", action="store_true", help="tiles not cut to the tissue")
    parser.add_argument("--compare", action="store_true",
                        help="each slide twice: today's path (torch, no crop) and the new one (--runtime, crop)")
    parser.add_argument("--baseline-model", default=None,
                        help="with --compare: the model folder of the 'today' run (default: --model)")
    parser.add_argument("--int8", type=int, default=0, metavar="N",
                        help="also run with NNCF's INT8 graph, N calibration crops per lab (needs nncf)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--slide", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        import tempfile

        args.sizes, args.width, args.sample, args.tile_px, args.halo_px = [1024], 0.0625, 1, 544, 16
        args.workdir = tempfile.mkdtemp(prefix="pronet-wsi-smoke-")
    from pronet_wsi.tiling import TilingConfig
    from pronet_wsi.wsi.pipeline import SegmentConfig

    args.tile_px = args.tile_px or TilingConfig().tile_px
    args.batch_size = args.batch_size or SegmentConfig().batch_size
    if args.child:
        run_child(args)
        return
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    args.model = str(model_dir(args, workdir))
    rows = []
    baseline = args.baseline_model or args.model
    paths = [("today", "torch", True, 0, baseline, args.baseline_tile_px),
             ("new", args.runtime, False, 0, args.model, args.tile_px)] if args.compare \
        else [(args.runtime, args.runtime, args.no_crop_glass, 0, args.model, args.tile_px)]
    if args.int8:
        paths = [*(paths if args.compare else []),
                 ("new + INT8", args.runtime, args.no_crop_glass, args.int8, args.model, args.tile_px)]
    for side, (label, runtime, no_crop, int8, model, tile_px) in [(s, p) for s in args.sizes for p in paths]:
        slide = workdir / (f"synthetic_{side}{'_full' if args.full_tissue else ''}"
                           f"{'' if args.slide_mpp == 0.25 else f'_mpp{args.slide_mpp:g}'}.tif")
        if not slide.exists():
            t = time.perf_counter()
            make_slide(slide, side, full_tissue=args.full_tissue, mpp=args.slide_mpp)
            print(f"wrote {slide} ({slide.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.0f} s",
                  file=sys.stderr)
        out = workdir / f"out_{side}_{label.replace(' ', '').replace('+', '_')}"
        cmd = [sys.executable, "-m", "benchmarks.wsi", "--child", "--slide", str(slide), "--out", str(out),
               "--model", model, "--tile-px", str(tile_px),
               *(["--halo-px", str(args.halo_px)] if args.halo_px is not None else []),
               "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--sample", str(args.sample),
               "--cells", str(args.cells), "--measurements", args.measurements, *(["--parquet"] * args.parquet),
               "--runtime", runtime, "--threads", str(args.threads), "--streams", str(args.streams),
               *(["--no-crop-glass"] * no_crop),
               "--int8", str(int8), "--amp", args.amp, "--device", args.device]
        child = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True,
                                          cwd=ROOT).stdout.splitlines()[-1])
        rec = child["record"]
        crop = "whole tiles" if no_crop else "cut to tissue"
        on = "" if child["device"] == "cpu" else f" on {child['device']}"
        rows.append({"path": f"{label} ({child['runtime']}{on}, tile {tile_px}, {crop}"
                             f"{', ' + Path(model).name if args.baseline_model else ''})",
                     "setup_s": child["setup_s"], "tissue_mm2": rec["measurements"]["tissue_area_mm2"],
                     "side": side, "gpx": side * side / 1e9, "tiles": rec["counts"]["tiles_run"],
                     "mpx": rec["mpx_processed"], "nuclei": child["nuclei"], "e2e_s": child["wall_s"],
                     "forward_s": child["forward_s"], "core_forward_s": child["core_forward_s"],
                     "input_mpx": rec["model_input_mpx"], "tissue_mpx": rec["tissue_mpx"],
                     "read_hw": child["read_hw"], "pp_ms_per_tile": child["pp_ms_per_tile"],
                     "pp_nuclei_per_tile": child["pp_nuclei_per_tile"], "ratio": child["wall_s"] / child["forward_s"],
                     "mpx_s": rec["mpx_processed"] / child["wall_s"], "rss_mb": child["peak_rss_mb"],
                     "timings": rec["timings_s"]})
        print(json.dumps(rows[-1]), file=sys.stderr)
    print(banner(seed=0))
    today = f"; today: {args.baseline_model}" if args.baseline_model else ""
    halo = args.halo_px if args.halo_px is not None else "each model's context_px"
    print(f"model: {args.model}{today}; tile {args.tile_px} (today: {args.baseline_tile_px}), halo {halo}, "
          f"batch {args.batch_size}, workers {args.workers or 'auto'}, amp {args.amp}; {os.cpu_count()} CPUs")
    print("| slide | path | Gpx | tissue tiles (read px) | tissue Mpx | core Mpx | model input Mpx | input / tissue | "
          "nuclei | end-to-end s | forward-only s | forward on cores s | e2e / forward | e2e / core forward | "
          "Mpx/s | peak RSS MB | post-proc ms/tile (realistic maps, nuclei/tile) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['side']}x{r['side']} | {r['path']} | {r['gpx']:.2f} | "
              f"{r['tiles']} ({r['read_hw'][0]}x{r['read_hw'][1]}) | "
              f"{r['tissue_mpx']:.0f} | {r['mpx']:.0f} | {r['input_mpx']:.0f} | "
              f"{r['input_mpx'] / r['tissue_mpx']:.2f} | "
              f"{r['nuclei']:,} | {r['e2e_s']:.0f} | {r['forward_s']:.0f} | {r['core_forward_s']:.0f} | "
              f"{r['ratio']:.2f} | {r['e2e_s'] / r['core_forward_s']:.2f} | {r['mpx_s']:.2f} | {r['rss_mb']:.0f} | "
              f"{r['pp_ms_per_tile']:.0f} ({r['pp_nuclei_per_tile']:.0f}) |")
    for r in rows:
        print(f"stage sums {r['side']} {r['path']}: " + ", ".join(f"{k} {v}" for k, v in r["timings"].items()))
    print()
    print("| slide | path | tissue mm² | model input / tissue | model setup s | end-to-end s | s per mm² | "
          "tiles wall s (summed over threads: read / predict / post-process + polygons) | stitch + export s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = r["timings"]
        pp = t.get("sum_postprocess_s", 0) + t.get("sum_polygons_s", 0)
        tiles = f"{t.get('sum_read_s', 0):.0f} / {t.get('sum_predict_s', 0):.0f} / {pp:.0f}"
        tail = t.get("stitch_s", 0) + t.get("export_s", 0)
        print(f"| {r['side']}x{r['side']} | {r['path']} | {r['tissue_mm2']:.2f} | "
              f"{r['input_mpx'] / r['tissue_mpx']:.2f} | {r['setup_s']:.1f} | {r['e2e_s']:.0f} | "
              f"{(r['e2e_s'] + r['setup_s']) / r['tissue_mm2']:.1f} | {t.get('tiles_wall_s', 0):.0f} ({tiles}) | "
              f"{tail:.0f} |")


if __name__ == "__main__":
    main()
