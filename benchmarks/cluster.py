"""Cluster overhead: a cohort of generated slides, threaded in one process vs a 2-worker loopback LocalCluster.

    python -m benchmarks.cluster                          # 4 slides of 4096^2 px, shipped model (else random 0.25)
    python -m benchmarks.cluster --side 2048 --width 0.25 # smaller slides, a random width-0.25 PRONet

Both paths go through the same cohort API (:func:`pronet_wsi.wsi.cohort.segment_batch`, what ``pronet-wsi segment``
runs), one after the other in this process, on the same slides (generated once into --workdir with
``benchmarks/wsi.py``'s tissue mosaic: 0.25 um/px JPEG pyramids, tissue in an ellipse on glass):

* **threaded**: load the model (``Predictor``) + ``segment_batch`` on the local thread pool (default
  threads: CPUs + 1; torch uses all cores);
* **cluster**: start ``LocalCluster`` (2 worker processes, CPUs / 2 Dask threads each, 127.0.0.1, dashboard on
  a free port) + ``segment_batch`` with its client (each worker loads the model on first use, within the run);
  the same as ``pronet-wsi segment --scheduler local:2``.

Prints setup, run and total wall times, the cluster path's overhead over the threaded one, and whether the
GeoJSONs are byte-identical; the cluster then runs the cohort a second time on its warm workers (imports done,
model loaded), which separates the one-off worker start-up from the per-tile cost. ``--repeat N`` alternates
the two N times and keeps each one's fastest.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from benchmarks.record import ROOT, banner


def run_threaded(items, out: Path, model: Path, cfg) -> dict:
    from pronet_wsi.inference import InferenceConfig, Predictor
    from pronet_wsi.wsi.cohort import segment_batch

    t0 = time.perf_counter()
    predictor = Predictor(model, InferenceConfig(batch_size=cfg.batch_size))
    t1 = time.perf_counter()
    outcomes = list(segment_batch(items, out, predictor, cfg))
    t2 = time.perf_counter()
    return {"setup_s": t1 - t0, "run_s": t2 - t1, "outcomes": outcomes}


def run_cluster(items, out: Path, model: Path, cfg, workers: int, threads_per_worker: int | None) -> dict:
    from distributed import Client

    from pronet_wsi.inference import InferenceConfig
    from pronet_wsi.wsi.cluster import ModelSpec, local_cluster
    from pronet_wsi.wsi.cohort import segment_batch

    t0 = time.perf_counter()
    spec = ModelSpec.load(model, InferenceConfig(batch_size=cfg.batch_size), pin_gpus=True)
    with local_cluster(workers, threads_per_worker) as cluster, Client(cluster, set_as_default=False) as client:
        client.wait_for_workers(workers)
        t1 = time.perf_counter()
        outcomes = list(segment_batch(items, out, spec, cfg, client=client, pin_gpus=True))
        t2 = time.perf_counter()
        threads = sum(client.nthreads().values())
        # the same again on the now warm workers (imports done, model loaded): the per-tile cost alone
        list(segment_batch(items, out.with_name(out.name + "-warm"), spec, cfg, client=client))
        t3 = time.perf_counter()
    return {"setup_s": t1 - t0, "run_s": t2 - t1, "warm_run_s": t3 - t2, "outcomes": outcomes, "threads": threads}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slides", type=int, default=4)
    p.add_argument("--side", type=int, default=4096, help="slide side in px (a multiple of 1024)")
    p.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes")
    p.add_argument("--threads-per-worker", type=int, default=None, help="default: CPUs / workers")
    p.add_argument("--model", default=None, help="model folder (default: shipped, else a random --width)")
    p.add_argument("--width", type=float, default=None, help="random PRONet of this width instead")
    p.add_argument("--tile-px", type=int, default=1024)
    p.add_argument("--halo-px", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--workdir", default=str(ROOT / "benchmarks" / "results" / "cluster"))
    p.add_argument("--smoke", action="store_true",
                   help="one 1024 px slide, a random width-1/16 network, 544 px tiles, one worker (does it run?)")
    args = p.parse_args()
    if args.smoke:
        import tempfile

        args.slides, args.side, args.width, args.workers, args.threads_per_worker = 1, 1024, 0.0625, 1, 1
        args.tile_px, args.halo_px, args.batch_size = 544, 16, 1
        args.workdir = tempfile.mkdtemp(prefix="pronet-wsi-smoke-")

    from benchmarks.wsi import make_slide, model_dir
    from pronet_wsi.tiling import TilingConfig
    from pronet_wsi.wsi.cohort import SlideItem
    from pronet_wsi.wsi.pipeline import SegmentConfig

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    items = []
    for k in range(args.slides):
        path = work / f"slide{k}-{args.side}.tif"
        if not path.exists():
            make_slide(path, args.side, seed=10 * k)
        items.append(SlideItem(path))
    model = model_dir(args, work)
    cfg = SegmentConfig(tiling=TilingConfig(args.tile_px, args.halo_px), batch_size=args.batch_size, overwrite=True)
    best: dict[str, dict] = {}
    for _ in range(args.repeat):
        for name in ("threaded", "cluster"):
            out = work / f"out-{name}"
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(out.with_name(out.name + "-warm"), ignore_errors=True)
            res = (run_threaded(items, out, model, cfg) if name == "threaded"
                   else run_cluster(items, out, model, cfg, args.workers, args.threads_per_worker))
            errors = [o.error for o in res["outcomes"] if o.error]
            if errors:
                raise SystemExit(f"{name}: {errors}")
            res["total_s"] = res["setup_s"] + res["run_s"]
            res["geojson"] = {o.item.stem: o.result.geojson.read_bytes() for o in res["outcomes"]}
            if name not in best or res["total_s"] < best[name]["total_s"]:
                best[name] = res
    records = [json.loads((work / "out-threaded" / f"{i.stem}.json").read_text()) for i in items]
    tiles = sum(r["counts"]["tiles_tissue"] for r in records)
    mpx = sum(r["mpx_processed"] for r in records)
    nuclei = sum(r["counts"]["nuclei"] for r in records)
    same = best["threaded"]["geojson"] == best["cluster"]["geojson"]
    print(banner(seed=0))
    print(f"{args.slides} slides of {args.side}^2 px, {tiles} tissue tiles, {mpx:.1f} Mpx at the model's mpp, "
          f"{nuclei:,} nuclei; model {model}; tile {args.tile_px}, halo {args.halo_px}, batch {args.batch_size}")
    print()
    print("| path | setup s | run s | total s | Mpx/s (total) | 2nd run, warm workers s | GeoJSON identical |")
    print("|---|---|---|---|---|---|---|")
    for name in ("threaded", "cluster"):
        r = best[name]
        label = name if name == "threaded" else f"LocalCluster {args.workers} x {r['threads'] // args.workers} thr"
        warm = f"{r['warm_run_s']:.1f}" if "warm_run_s" in r else "-"
        print(f"| {label} | {r['setup_s']:.1f} | {r['run_s']:.1f} | {r['total_s']:.1f} | {mpx / r['total_s']:.2f} | "
              f"{warm} | {'yes' if same or name == 'threaded' else 'NO'} |")
    t, c = best["threaded"], best["cluster"]
    print()
    print(f"cluster overhead: total {100 * (c['total_s'] / t['total_s'] - 1):+.1f} %, run only "
          f"{100 * (c['run_s'] / t['run_s'] - 1):+.1f} %, warm run vs threaded run "
          f"{100 * (c['warm_run_s'] / t['run_s'] - 1):+.1f} %, setup {c['setup_s'] - t['setup_s']:+.1f} s")


if __name__ == "__main__":  # required: LocalCluster starts worker processes by spawning
    main()
