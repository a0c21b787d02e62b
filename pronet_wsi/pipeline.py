"""segment_slide(): one slide from file to GeoJSON. The only module that wires the stages together and knows Dask.

1. open the slide, make the processing frame (model mpp), the thumbnail and the tissue mask;
2. tile the frame (cores partition it) and keep the tiles with tissue;
3. run the tiles as Dask tasks, one batch each: read -> model (one batch at a time, behind a lock) ->
   post-process -> candidates -> per-tile part on disk. Several tasks run at once, so reading and
   post-processing overlap with the model; finished tiles are skipped on a rerun;
4. stitch: decide which tile's view of each nucleus to keep (needs only the neighbouring tiles' centres);
5. stream the kept nuclei to GeoJSON (and optionally a zarr label image), then the overlay and the run record.

Memory is bounded by the tasks in flight and a window of three tile rows of centres; nothing slide-sized.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pronet_wsi import __version__
from pronet_wsi.assemble import write_outputs
from pronet_wsi.errors import InputError
from pronet_wsi.export import feature_bodies, save_mask_png, write_json
from pronet_wsi.geometry import Frame, rc_to_xy
from pronet_wsi.instances import tile_instances
from pronet_wsi.parts import PartStore
from pronet_wsi.postprocess import postprocess
from pronet_wsi.slide import Slide, open_slide
from pronet_wsi.stitching import StitchConfig
from pronet_wsi.tiling import Tile, TileGrid, TilingConfig, select_tiles
from pronet_wsi.tissue import TissueConfig, tissue_mask

log = logging.getLogger(__name__)

_MODEL_LOCK = threading.Lock()  # one model batch at a time per process


@dataclass(frozen=True)
class SegmentConfig:
    """Settings of a whole-slide run (besides the model).

    batch_size : tiles per model call. workers : Dask threads (0 = CPU count + 1, at most 9).
    scheduler : None for the local threaded scheduler, or the address of a running Dask scheduler.
    use_tissue_mask : skip glass. gzip : write ``.geojson.gz``. labels_zarr : also write the label image.
    overwrite : redo a slide whose output exists. overlay_max_px : long side of the overlay PNG (also the
    image the tissue mask is computed on).
    """

    tiling: TilingConfig = field(default_factory=TilingConfig)
    tissue: TissueConfig = field(default_factory=TissueConfig)
    stitch: StitchConfig = field(default_factory=StitchConfig)
    use_tissue_mask: bool = True
    batch_size: int = 4
    workers: int = 0
    scheduler: str | None = None
    gzip: bool = False
    labels_zarr: bool = False
    overwrite: bool = False
    overlay_max_px: int = 2048

    def __post_init__(self) -> None:
        if not 1 <= self.batch_size <= 256:
            raise ValueError(f"batch_size={self.batch_size}: must be between 1 and 256")
        if self.overlay_max_px < 64:
            raise ValueError(f"overlay_max_px={self.overlay_max_px}: must be >= 64")
        if not 0 <= self.workers <= 256:
            raise ValueError(f"workers={self.workers}: must be between 0 (auto) and 256")
        if self.tiling.halo_px < 2 * self.stitch.match_radius_px:
            raise ValueError(f"halo_px={self.tiling.halo_px}: must be at least twice the match radius "
                             f"({self.stitch.match_radius_px} px) so both tiles see a nucleus on their seam")

    @property
    def n_workers(self) -> int:
        return self.workers or min(9, (os.cpu_count() or 1) + 1)


@dataclass
class SlideResult:
    """What happened to one slide. ``status`` is ``done`` or ``skipped``."""

    slide: Path
    status: str
    geojson: Path
    n_nuclei: int = 0
    n_tiles: int = 0
    n_tiles_resumed: int = 0
    mpx: float = 0.0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.status == "skipped":
            return f"{self.slide.name}: skipped, {self.geojson} exists (use --overwrite to redo it)"
        rate = self.mpx / self.seconds if self.seconds > 0 else 0.0
        resumed = f" ({self.n_tiles_resumed} resumed)" if self.n_tiles_resumed else ""
        return (f"{self.slide.name}: {self.n_nuclei:,} nuclei in {self.n_tiles} tiles{resumed}, "
                f"{self.mpx:.1f} Mpx in {self.seconds:.1f} s ({rate:.2f} Mpx/s) -> {self.geojson}")


def slide_stem(path: Path) -> str:
    name = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def output_paths(slide_path: Path, out_dir: Path, gzip_output: bool = False) -> dict[str, Path]:
    stem = slide_stem(slide_path)
    out_dir = Path(out_dir)
    return {"geojson": out_dir / (stem + (".geojson.gz" if gzip_output else ".geojson")),
            "record": out_dir / f"{stem}.json", "overlay": out_dir / f"{stem}_overlay.png",
            "mask": out_dir / f"{stem}_tissue.png", "labels": out_dir / f"{stem}_labels.zarr",
            "parts": out_dir / f".{stem}.parts"}


def check_writable(out_dir: Path) -> None:
    """Create ``out_dir`` if needed and make sure files can be written there (InputError otherwise)."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".pronet-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"{out_dir}: output folder is not writable ({exc.strerror or type(exc).__name__}); "
                         f"choose another -o") from exc


def is_finished(paths: dict[str, Path]) -> bool:
    """A previous run finished this slide: its GeoJSON and a run record with status ``done`` exist."""
    import json

    if not (paths["geojson"].exists() and paths["record"].exists()):
        return False
    try:
        return json.loads(paths["record"].read_text()).get("status") == "done"
    except (OSError, ValueError):
        return False


# -- per-tile work (runs in Dask tasks) ---------------------------------------------------------------------
@dataclass(frozen=True)
class _Job:
    """Everything a tile task needs besides the model (picklable, for a Dask cluster)."""

    slide_path: str
    backend: str
    mpp: float
    frame: Frame
    tiling: TilingConfig
    match_radius_px: float
    with_masks: bool
    parts_root: str
    fingerprint: dict


_HANDLES: dict[tuple, Slide] = {}
_HANDLES_LOCK = threading.Lock()


def _thread_slide(job: _Job) -> Slide:
    """One open slide per (file, thread): backends need not be thread-safe."""
    key = (job.slide_path, job.backend, job.mpp, threading.get_ident())
    with _HANDLES_LOCK:
        slide = _HANDLES.get(key)
    if slide is None:
        slide = open_slide(job.slide_path, job.backend, job.mpp)
        with _HANDLES_LOCK:
            _HANDLES[key] = slide
    return slide


def _close_slides(path: str) -> None:
    with _HANDLES_LOCK:
        for key in [k for k in _HANDLES if k[0] == path]:
            _HANDLES.pop(key).close()


def run_batch(job: _Job, tiles: list[Tile], predictor, on_tile_done=None) -> list[dict]:
    """Read, predict, post-process and save a batch of tiles; returns one stats dict per tile."""
    slide = _thread_slide(job)
    t0 = time.perf_counter()
    size = job.tiling.tile_px
    images = np.stack([slide.read_box(job.frame.box_to_level0(t.read), (size, size)) for t in tiles])
    t1 = time.perf_counter()
    with _MODEL_LOCK:
        t1 = time.perf_counter()
        maps = predictor.predict_batch(images)
        t2 = time.perf_counter()
    del images
    store = PartStore(Path(job.parts_root))
    config = predictor.postprocess_config
    out = []
    for k, tile in enumerate(tiles):
        t3 = time.perf_counter()
        tile_maps = {name: maps[name][k] for name in ("foreground", "offsets", "centers")}
        seg = postprocess(tile_maps, config)
        t4 = time.perf_counter()
        inst = tile_instances(seg.labels, seg.centers_rc, seg.center_scores, tile_maps["foreground"], tile.read,
                              tile.core, job.frame, predictor.mpp, job.match_radius_px, job.with_masks)
        bodies = feature_bodies(inst)
        t5 = time.perf_counter()
        cut = _cut_at_edge(seg, tile, job.match_radius_px)
        stats = {"candidates": len(inst), "in_core": int(inst.in_core.sum()), "cut_at_edge": cut,
                 "read_s": (t1 - t0) / len(tiles), "predict_s": (t2 - t1) / len(tiles),
                 "postprocess_s": t4 - t3, "polygons_s": t5 - t4}
        t6 = time.perf_counter()
        store.save(tile.key, inst, bodies, stats)
        stats["save_s"] = time.perf_counter() - t6
        out.append({"key": tile.key, **stats})
        if on_tile_done is not None:
            on_tile_done(tile.key)
    return out


def _cut_at_edge(seg, tile: Tile, radius: float) -> int:
    """How many of the tile's candidates touch the edge of the tile (the halo was too small for them)."""
    if seg.n == 0:
        return 0
    lab = seg.labels
    edge = np.zeros(seg.n + 1, bool)
    edge[np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]).astype(np.int64)] = True
    centers_p = rc_to_xy(seg.centers_rc, (tile.read.x0, tile.read.y0))
    return int((edge[1:] & tile.core.expand(radius).contains_xy(centers_p)).sum())


def _run_tiles(job: _Job, batches: list[list[Tile]], predictor, config: SegmentConfig, progress,
               on_tile_done) -> list[dict]:
    """Run the batches on the local threaded scheduler or a Dask cluster; ``progress(stats_list)`` per batch."""
    import dask

    if config.scheduler:
        from distributed import Client, as_completed

        results = []
        with Client(config.scheduler, set_as_default=False) as client:
            remote = client.scatter(predictor, broadcast=True, hash=False)
            futures = [client.submit(run_batch, job, b, remote, pure=False) for b in batches]
            for fut in as_completed(futures, loop=client.loop):
                res = fut.result()
                results.extend(res)
                progress(res)
                for r in res:
                    if on_tile_done is not None:
                        on_tile_done(r["key"])
        return results

    from dask.callbacks import Callback

    class _Progress(Callback):
        def _posttask(self, key, result, dsk, state, worker_id):
            if isinstance(result, list):
                progress(result)

    tasks = [dask.delayed(run_batch, pure=False)(job, b, predictor, on_tile_done) for b in batches]
    with _Progress():
        done = dask.compute(*tasks, scheduler="threads", num_workers=config.n_workers)
    return [r for batch in done for r in batch]


# -- the driver ------------------------------------------------------------------------------------------------
def segment_slide(slide_path: str | os.PathLike, out_dir: str | os.PathLike, predictor,
                  config: SegmentConfig = SegmentConfig(), *, backend: str = "auto", mpp: float | None = None,
                  progress: bool = False, on_tile_done=None) -> SlideResult:
    """Segment one slide into ``out_dir/<stem>.geojson`` (see the module docstring).

    Parameters
    ----------
    predictor : an object with ``mpp``, ``postprocess_config`` and ``predict_batch`` (see
        :class:`pronet_wsi.inference.Predictor`).
    backend, mpp : passed to :func:`pronet_wsi.slide.open_slide`.
    progress : show a progress bar (only when stderr is a terminal).
    on_tile_done : called with each finished tile's key (tests use it to simulate a kill).

    Raises
    ------
    InputError : unreadable slide, missing mpp, output folder not writable. Nothing but resumable per-tile
        parts is left behind by a failed run.
    """
    t_start = time.perf_counter()
    slide_path, out_dir = Path(slide_path), Path(out_dir)
    paths = output_paths(slide_path, out_dir, config.gzip)
    if not config.overwrite and is_finished(paths):
        return SlideResult(slide_path, "skipped", paths["geojson"])
    check_writable(out_dir)
    timings: dict[str, float] = {}
    warnings: list[str] = []
    with open_slide(slide_path, backend, mpp) as slide:
        frame = Frame.for_slide(slide.shape, slide.mpp, predictor.mpp)
        timings["open_s"] = time.perf_counter() - t_start
        t = time.perf_counter()
        thumb, thumb_ds = slide.thumbnail(config.overlay_max_px)
        mask = tissue_mask(thumb, thumb_ds * slide.mpp, config.tissue) if config.use_tissue_mask else None
        grid = TileGrid(frame.shape, config.tiling)
        tiles = select_tiles(grid, frame, mask, thumb_ds)
        timings["tissue_s"] = time.perf_counter() - t
        slide_info = slide.info()
        backend_used = slide.backend
        slide_mpp = slide.mpp
    hint = getattr(predictor, "halo_hint_px", None)
    if hint and config.tiling.halo_px < hint:
        warnings.append(f"--halo-px {config.tiling.halo_px} is below the model's hint of {hint} px; nuclei on "
                        f"tile seams may be cut")
    if not tiles:
        warnings.append("no tissue found (the slide looks empty); wrote an empty FeatureCollection")
    fingerprint = {"version": __version__, "slide": str(slide_path.resolve()), "size": slide_path.stat().st_size,
                   "mtime_ns": slide_path.stat().st_mtime_ns, "backend": backend_used, "mpp": slide_mpp,
                   "model": _model_id(predictor), "tiling": asdict(config.tiling), "stitch": asdict(config.stitch),
                   "masks": config.labels_zarr}
    store = PartStore(paths["parts"], fingerprint)
    if config.overwrite:
        store.remove()
        store = PartStore(paths["parts"], fingerprint)
    done_before = store.done()
    pending = [t for t in tiles if t.key not in done_before]
    n_resumed = len(tiles) - len(pending)
    job = _Job(str(slide_path), backend_used, slide_mpp, frame, config.tiling, config.stitch.match_radius_px,
               config.labels_zarr, str(paths["parts"]), fingerprint)
    batches = [pending[i : i + config.batch_size] for i in range(0, len(pending), config.batch_size)]
    core_mpx = {t.key: t.core.area / 1e6 for t in tiles}
    bar = _progress_bar(len(tiles), n_resumed, slide_path.name, progress)
    counter = {"nuclei": 0, "mpx": 0.0, "t0": time.perf_counter()}
    lock = threading.Lock()

    def on_progress(stats: list[dict]) -> None:
        with lock:
            counter["nuclei"] += sum(s["in_core"] for s in stats)
            counter["mpx"] += sum(core_mpx[s["key"]] for s in stats)
            if bar is not None:
                rate = counter["mpx"] / max(time.perf_counter() - counter["t0"], 1e-9)
                bar.set_postfix_str(f"{counter['nuclei']:,} nuclei, {rate:.2f} Mpx/s", refresh=False)
                bar.update(len(stats))

    t = time.perf_counter()
    try:
        tile_stats = _run_tiles(job, batches, predictor, config, on_progress, on_tile_done) if batches else []
    finally:
        if bar is not None:
            bar.close()
        _close_slides(job.slide_path)
    timings["tiles_wall_s"] = time.perf_counter() - t
    for name in ("read_s", "predict_s", "postprocess_s", "polygons_s", "save_s"):
        timings[f"sum_{name}"] = round(float(sum(s.get(name, 0.0) for s in tile_stats)), 3)
    all_stats = [store.load_stats(tl.key) for tl in tiles]
    n_cut = sum(s["cut_at_edge"] for s in all_stats)
    if n_cut:
        warnings.append(f"{n_cut} nuclei near a tile core touch the tile edge; use a larger --halo-px")
    counts = write_outputs(store, grid, tiles, frame, paths, config, slide_stem(slide_path), thumb, thumb_ds,
                            mask, slide_mpp, predictor.mpp, timings)
    if mask is not None:
        save_mask_png(paths["mask"], mask)
    total = time.perf_counter() - t_start
    timings["total_s"] = total
    mpx = sum(core_mpx.values())
    record = {"status": "done", "slide": slide_info, "output": {k: str(v) for k, v in paths.items() if k != "parts"},
              "model": _model_id(predictor), "model_mpp": predictor.mpp,
              "config": {"segment": _plain(config), "postprocess": _plain(predictor.postprocess_config)},
              "processing": {"scale_level0_per_px": frame.scale, "shape_hw": list(frame.shape)},
              "counts": {"tiles_grid": len(grid), "tiles_tissue": len(tiles), "tiles_resumed": n_resumed,
                         "tiles_run": len(pending), "cut_at_tile_edge": n_cut, **counts},
              "mpx_processed": round(mpx, 3),
              "timings_s": {k: round(v, 3) for k, v in timings.items()}, "warnings": warnings,
              "versions": _versions(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json(paths["record"], record)
    store.remove()
    for w in warnings:
        log.info("%s: %s", slide_path.name, w)
    return SlideResult(slide_path, "done", paths["geojson"], counts["nuclei"], len(tiles), n_resumed, mpx, total,
                       warnings)


def _progress_bar(total: int, initial: int, name: str, enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=name, unit="tile", dynamic_ncols=True, leave=False)


def _model_id(predictor) -> str:
    bundle = getattr(predictor, "bundle", None)
    path = getattr(bundle, "path", None) or getattr(predictor, "model_dir", None)
    if path is not None:
        weights = Path(path) / "weights.pt"
        stamp = weights.stat().st_mtime_ns if weights.exists() else 0
        return f"{Path(path).resolve()}@{stamp}"
    return getattr(predictor, "name", type(predictor).__name__)


def _plain(obj) -> dict:
    try:
        return asdict(obj)
    except TypeError:
        return {"repr": repr(obj)}


def _versions() -> dict:
    import importlib.metadata as md

    out = {"pronet_wsi": __version__, "python": platform.python_version()}
    for pkg in ("numpy", "torch", "openslide-python", "openslide-bin", "tiffslide", "dask", "shapely", "zarr"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out

