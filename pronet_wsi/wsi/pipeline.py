"""segment_slide(): one slide from file to GeoJSON. The only module that wires the stages together.

1. open the slide, make the processing frame (model mpp), the thumbnail and the tissue mask;
2. tile the frame (cores partition it) and keep the tiles with tissue;
3. run the tiles as tasks, one batch each: read -> model (one batch at a time, behind a lock) ->
   post-process -> candidates -> per-tile part on disk. Several tasks run at once, so reading and
   post-processing overlap with the model; finished tiles are skipped on a rerun;
4. stitch: decide which tile's view of each nucleus to keep (needs only the neighbouring tiles' centres and
   outlines);
5. stream the kept nuclei to GeoJSON (and optionally a zarr label image), then the overlay and the run record.

:func:`suggest_slide` wires the stages for ``suggest`` (slide, tissue, boxes read at the model's mpp, model,
the pure scoring of :mod:`pronet_wsi.suggest`).

Steps 1-2 are :func:`prepare_slide` (a :class:`SlidePlan`), steps 4-5 :func:`finish_slide`; both run where the
caller runs. Step 3 runs on a local thread pool, or on a Dask distributed cluster
(:mod:`pronet_wsi.wsi.cluster`, which also keeps several slides in flight at once); the tile tasks write their parts
to the output folder, so on a cluster it must be on a file system the workers share.

Memory is bounded by the tasks in flight and a window of five tile rows of centres and outlines
(:mod:`pronet_wsi.wsi.assemble`); nothing slide-sized.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Generic, TypeVar

from pronet_wsi import __version__
from pronet_wsi.errors import InputError
from pronet_wsi.export import (
    nucleus_uuid,
    part_path,
    save_mask_png,
    tissue_annotation,
    write_json,
    write_tissue_geojson,
)
from pronet_wsi.files import OutputLock, OutputPaths, check_outputs, same_file, slide_stem, sweep_temp
from pronet_wsi.geometry import Frame, check_scale
from pronet_wsi.glass import crop_to_tissue
from pronet_wsi.progress import progress_bar
from pronet_wsi.slide import open_slide
from pronet_wsi.suggest import SuggestConfig
from pronet_wsi.tiling import TileGrid, select_tiles
from pronet_wsi.tissue import tissue_mask
from pronet_wsi.wsi.assemble import write_outputs
from pronet_wsi.wsi.plan import ModelInfo, Overview, RunLog, SegmentConfig, SlidePlan, SlideResult, SlideSource
from pronet_wsi.wsi.tile_store import TileStore
from pronet_wsi.wsi.tile_task import ThreadExecutor, TileJob, TileModel, close_slides, post_margin_px

log = logging.getLogger(__name__)

__all__ = ["SegmentConfig", "SlideItem", "SlidePlan", "SlideResult", "finish_slide", "prepare_slide", "run_slides",
           "segment_slide", "suggest_slide"]

MAX_SLIDES_IN_FLIGHT = 32  # each holds its thumbnail and tissue mask on the client (~10 MB)

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


def is_finished(paths: OutputPaths, slide_path: Path | None = None) -> bool:
    """A previous run finished this slide: its GeoJSON and a run record with status ``done`` exist.

    With ``slide_path``, a record of another slide under the same output name is an InputError (never "skipped").
    """
    import json

    if not (paths.geojson.exists() and paths.record.exists()):
        return False
    try:
        rec = json.loads(paths.record.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(rec, dict) or rec.get("status") != "done":
        return False
    if slide_path is not None:
        info = rec["slide"] if isinstance(rec.get("slide"), dict) else {}
        made_from = info.get("path_resolved") or info.get("path")
        if made_from and not same_file(Path(made_from), Path(slide_path)):
            raise InputError(f"{paths.geojson}: made from another slide ({made_from}), not {slide_path}; give this "
                             f"slide another output name (manifest output column) or -o, or pass --overwrite")
    return True


def slide_outputs(paths: OutputPaths, config: SegmentConfig) -> list[Path]:
    """The files a run of ``config`` writes for one slide (GeoJSON, record, overlay and the optional ones); the
    run record lists these and no others."""
    outs = [paths.geojson, paths.record, paths.overlay]
    if config.use_tissue_mask:
        outs.append(paths.mask)
        if config.tissue_geojson:
            outs.append(paths.tissue)
    if config.labels_zarr:
        outs.append(paths.labels)
    if config.parquet:
        outs.append(paths.table)
    return outs


def check_slide(slide_path: str | os.PathLike, out_dir: str | os.PathLike, config: SegmentConfig,
                name: str | None = None, inputs: list[Path] | tuple[Path, ...] = ()) -> bool:
    """Whether the slide is finished (skip it), after checking that its outputs may be written.

    Raises InputError: an output is an input (``slide_path`` or one of ``inputs``: never, not even with
    ``config.overwrite``), exists and was not written by pronet-wsi, or is the finished result of another slide
    (both unless ``config.overwrite``).
    """
    slide_path = Path(slide_path)
    paths = OutputPaths.of(slide_path, Path(out_dir), config.gzip, name or slide_stem(slide_path))
    outs = slide_outputs(paths, config)
    check_outputs(outs, [slide_path, *inputs], config.overwrite)
    return not config.overwrite and is_finished(paths, slide_path)


# -- the driver ------------------------------------------------------------------------------------------------
def prepare_slide(slide_path: str | os.PathLike, out_dir: str | os.PathLike, predictor: TileModel,
                  config: SegmentConfig = SegmentConfig(), *, backend: str = "auto", mpp: float | None = None,
                  name: str | None = None, inputs: list[Path] | tuple[Path, ...] = ()) -> SlidePlan | SlideResult:
    """Steps 1-2 of the module docstring: a :class:`SlidePlan`, or a ``skipped`` result for a finished slide.

    ``name`` is the output stem (default: the slide's); ``inputs`` are other files no output may replace (the
    other slides of a batch). Raises what :func:`segment_slide` raises.
    """
    run_log = RunLog()
    slide_path, out_dir = Path(slide_path), Path(out_dir)
    name = name or slide_stem(slide_path)
    paths = OutputPaths.of(slide_path, out_dir, config.gzip, name)
    skipped = SlideResult(slide_path, "skipped", paths.geojson, name=name)
    if not slide_path.is_file():
        raise InputError(f"{slide_path}: file not found; check the path" if not slide_path.exists() else
                         f"{slide_path}: not a file; give a slide file")
    if check_slide(slide_path, out_dir, config, name, inputs):
        return skipped
    check_writable(out_dir)
    lock = OutputLock(paths.lock, str(paths.geojson)).acquire()  # LockHeld if another run has it
    try:
        if check_slide(slide_path, out_dir, config, name, inputs):  # it finished while we waited for the lock
            lock.release()
            return skipped
        for path in (paths.geojson, paths.record, paths.overlay, paths.mask, paths.tissue, paths.table):
            sweep_temp(out_dir, path.name)  # left by a killed run of this slide (we hold its lock)
        k = 2
        while any(out_dir.glob(f".{part_path(paths.geojson, k).name}.*")) or part_path(paths.geojson, k).exists():
            sweep_temp(out_dir, part_path(paths.geojson, k).name)  # parts of a split GeoJSON
            k += 1
        return _plan(slide_path, name, paths, predictor, config, backend, mpp, run_log, lock)
    except BaseException:
        lock.release()
        raise


def _plan(slide_path: Path, name: str, paths: OutputPaths, predictor: TileModel, config: SegmentConfig, backend: str,
          mpp: float | None, run_log: RunLog, lock: OutputLock) -> SlidePlan:
    timings, warnings = run_log.timings, run_log.warnings
    with open_slide(slide_path, backend, mpp) as slide:
        check_scale(slide.mpp, predictor.mpp, f"{slide_path} ({slide.mpp_source})")
        frame = Frame.for_slide(slide.shape, slide.mpp, predictor.mpp)
        timings["open_s"] = time.perf_counter() - run_log.t_start
        t = time.perf_counter()
        thumb, thumb_ds = slide.thumbnail(config.overlay_max_px)
        mask = tissue_mask(thumb, thumb_ds * slide.mpp, config.tissue) if config.use_tissue_mask else None
        stride = getattr(predictor, "stride", 16)  # test doubles may lack it
        grid = TileGrid(frame.shape, config.tiling, stride)
        tiles = select_tiles(grid, frame, mask, thumb_ds)
        if mask is not None and config.crop_glass:
            tiles = crop_to_tissue(tiles, frame, mask, thumb_ds, config.tiling.halo_px, stride)
        timings["tissue_s"] = time.perf_counter() - t
        source = SlideSource(slide_path, name, slide.mpp, slide.backend, slide.info())
        warnings.extend(slide.notes)  # e.g. 12-bit data read by its real range
    context = predictor.context_px
    if config.tiling.halo_px < context:
        warnings.append(f"--halo-px {config.tiling.halo_px} is below the model's context of {context} px; nuclei "
                        f"on tile seams may differ from an untiled run")
    reach = config.stitch.match_radius_px + 2 * config.measure.cells_um / predictor.mpp
    if config.measure.cells_um > 0 and config.tiling.halo_px < reach + 32:
        warnings.append(f"--halo-px {config.tiling.halo_px} is below {reach + 32:.0f} px (match radius + twice "
                        f"--cells + a nucleus); cells on tile seams may differ from an untiled run")
    classifier = getattr(predictor.postprocess_config, "nucleus_classifier", None)
    classifier_um = classifier.reach_um if classifier is not None else 0.0
    classifier_px = classifier_um / predictor.mpp + 32 if classifier_um else 0.0
    if config.tiling.halo_px < classifier_px:
        warnings.append(f"--halo-px {config.tiling.halo_px} is below {classifier_px:.0f} px (the nucleus classifier's "
                        f"neighbourhood + a nucleus); classes on tile seams may differ from an untiled run")
    if not tiles:
        warnings.append("no tissue found (the slide looks empty); wrote an empty FeatureCollection")
    classes: tuple[str, ...] = tuple(getattr(predictor, "classes", ()))  # test doubles may be untyped
    int8 = getattr(predictor, "int8_graph", None)
    forward = str(getattr(predictor, "runtime", "")) + (f" int8 {int8[:16]}" if int8 else "")
    model = ModelInfo(_model_id(predictor), predictor.mpp, _plain(predictor.postprocess_config), classes, forward)
    # everything that changes a tile's result: parts made under other settings are never mixed in
    fingerprint = {"version": __version__, "slide": str(slide_path.resolve()), "size": slide_path.stat().st_size,
                   "mtime_ns": slide_path.stat().st_mtime_ns, "backend": source.backend, "mpp": source.mpp,
                   "pixel_range": source.info.get("pixel_max"), "model": model.id, "model_mpp": model.mpp,
                   "postprocess": model.postprocess, "context_px": context,
                   "tiling": asdict(config.tiling), "stitch": asdict(config.stitch), "masks": config.labels_zarr,
                   "measure": asdict(config.measure), "crop_glass": config.crop_glass}
    inference = getattr(predictor, "config", None) or getattr(predictor, "inference", None)
    if getattr(inference, "tta", False):
        fingerprint["tta"] = True  # parts made with and without TTA never mix
    if getattr(predictor, "runtime", "torch") != "torch":
        fingerprint["runtime"] = predictor.runtime  # type: ignore[attr-defined]  # nor with other runtimes' maps
    if int8:
        fingerprint["int8"] = int8  # nor INT8 maps with float ones
    if config.overwrite:
        TileStore(paths.parts).remove()
    store = TileStore(paths.parts, fingerprint)
    if store.restarted:
        warnings.append(f"finished tiles of an earlier run were made with other {store.restarted}; started over")
    done_before = store.done(verify=True)
    for p in store.damaged:
        warnings.append(f"{p}: damaged part file (interrupted copy or disk fault); its tile was run again")
    pending = [t for t in tiles if t.key not in done_before]
    job = TileJob(slide_path=str(slide_path), backend=source.backend, mpp=source.mpp, frame=frame,
                  tiling=config.tiling, match_radius_px=config.stitch.match_radius_px,
                  with_masks=config.labels_zarr, parts_root=str(paths.parts), fingerprint=fingerprint,
                  classes=classes, class_colors=tuple(getattr(predictor, "class_colors", ())) if classes else (),
                  measure=config.measure,
                  post_margin_px=post_margin_px(config.stitch.match_radius_px, config.measure.cells_um,
                                                predictor.mpp, classifier_um))
    batches = tuple(tuple(pending[i : i + config.batch_size]) for i in range(0, len(pending), config.batch_size))
    return SlidePlan(slide=source, paths=paths, config=config, model=model, frame=frame, grid=grid,
                     tiles=tuple(tiles), batches=batches, overview=Overview(thumb, thumb_ds, mask), job=job,
                     log=run_log, lock=lock)


def finish_slide(plan: SlidePlan, tile_stats: list[dict], tiles_wall_s: float) -> SlideResult:
    """Steps 4-5 of the module docstring, once every tile of ``plan`` has its part on disk.

    ``tile_stats`` are the stats dicts the tile tasks of this run returned (timings are summed into the record).
    """
    config, paths, overview = plan.config, plan.paths, plan.overview
    timings, warnings = plan.log.timings, plan.log.warnings
    store = TileStore(paths.parts)
    timings["tiles_wall_s"] = tiles_wall_s
    for key in ("read_s", "wait_s", "predict_s", "postprocess_s", "polygons_s", "save_s"):
        timings[f"sum_{key}"] = round(float(sum(s.get(key, 0.0) for s in tile_stats)), 3)
    n_cut = sum(store.load_stats(tl.key)["cut_at_edge"] for tl in plan.tiles)
    if n_cut:
        warnings.append(f"{n_cut} nuclei near a tile core touch the tile edge; use a larger --halo-px")
    counts = write_outputs(plan, store, ids_key(plan))
    area_um2_sum = counts.pop("area_um2_sum")
    class_counts = counts.pop("class_counts")
    parts = counts.pop("geojson_parts")
    written = {str(p) for p in slide_outputs(paths, config)}
    output = {k: v for k, v in paths.user_files().items() if v in written}
    if len(parts) > 1:
        output["geojson_parts"] = parts
    if overview.mask is not None:
        save_mask_png(paths.mask, overview.mask)
        if config.tissue_geojson:
            write_tissue_geojson(paths.tissue, tissue_annotation(overview.mask, overview.ds,
                                                                    nucleus_uuid(ids_key(plan), 0)))
    tissue_mm2 = overview.tissue_mm2(plan.slide.mpp, plan.frame.level0_shape)
    total = time.perf_counter() - plan.log.t_start
    timings["total_s"] = total
    mpx = sum(plan.core_mpx.values())
    model_mpp = plan.model.mpp
    record = {"status": "done", "name": plan.slide.name,
              "slide": {**plan.slide.info, "path_resolved": str(plan.slide.path.resolve())},
              "output": output,
              "model": plan.model.id, "model_mpp": model_mpp, "forward": plan.model.forward,
              "config": {"segment": _plain(config), "postprocess": plan.model.postprocess},
              "processing": {"scale_level0_per_px": plan.frame.scale, "shape_hw": list(plan.frame.shape)},
              "counts": {"tiles_grid": len(plan.grid), "tiles_tissue": len(plan.tiles),
                         "tiles_resumed": plan.n_resumed, "tiles_run": sum(len(b) for b in plan.batches),
                         "cut_at_tile_edge": n_cut, **counts},
              "classes": _class_counts(plan.model.classes, class_counts, tissue_mm2),
              "measurements": {"tissue_area_mm2": round(tissue_mm2, 6),
                               "processed_area_mm2": round(mpx * model_mpp**2, 6),
                               "nuclei_per_mm2": round(counts["nuclei"] / tissue_mm2, 3) if tissue_mm2 else None,
                               "mean_area_um2": round(area_um2_sum / counts["nuclei"], 3) if counts["nuclei"]
                               else None},
              "mpx_processed": round(mpx, 3),
              "model_input_mpx": round(sum(t.read.area for t in plan.tiles) / 1e6, 3),
              "tissue_mpx": round(tissue_mm2 * 1e6 / model_mpp**2 / 1e6, 3),
              "timings_s": {k: round(v, 3) for k, v in timings.items()}, "warnings": warnings,
              "versions": _versions(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        write_json(paths.record, record)
    except BaseException:  # no GeoJSON without its "done" record; this run wrote it, so this run removes it
        for path in [*map(Path, parts), *([paths.table] if config.parquet else [])]:
            path.unlink(missing_ok=True)
        raise
    store.remove()
    for w in warnings:
        log.info("%s: %s", plan.slide.path.name, w)
    return SlideResult(plan.slide.path, "done", paths.geojson, n_nuclei=counts["nuclei"], n_tiles=len(plan.tiles),
                       n_tiles_resumed=plan.n_resumed, mpx=mpx, seconds=total, warnings=warnings,
                       name=plan.slide.name)


def segment_slide(slide_path: str | os.PathLike, out_dir: str | os.PathLike, predictor: TileModel,
                  config: SegmentConfig = SegmentConfig(), *, backend: str = "auto", mpp: float | None = None,
                  name: str | None = None, progress: bool = False, on_tile_done=None, executor=None,
                  inputs: list[Path] | tuple[Path, ...] = ()) -> SlideResult:
    """Segment one slide into ``out_dir/<stem>.geojson`` (see the module docstring): :func:`run_slides` of one.

    Parameters
    ----------
    predictor : an object with ``mpp``, ``postprocess_config`` and ``predict_batch`` (see
        :class:`pronet_wsi.inference.Predictor`).
    backend, mpp : passed to :func:`pronet_wsi.slide.open_slide`.
    name : output file stem (default: the slide's file name without its extension).
    progress : show a progress bar (only when stderr is a terminal).
    on_tile_done : called with each finished tile's key (tests use it to simulate a kill).
    inputs : files no output may replace besides the slide (the other slides of a batch).
    executor : runs the tile batches (default: a :class:`~pronet_wsi.wsi.tile_task.ThreadExecutor` of
        ``config.n_workers`` threads, closed at the end), e.g. ``pronet_wsi.wsi.cluster.DaskExecutor(client)``.

    Raises
    ------
    InputError : unreadable slide, missing mpp, output folder not writable. Nothing but resumable per-tile
        parts is left behind by a failed run.
    """
    item = SlideItem(Path(slide_path), mpp, name)
    own = executor is None
    executor = executor or ThreadExecutor(config.n_workers)
    try:
        for _, res in run_slides([item], out_dir, predictor, config, executor, backend=backend, progress=progress,
                                 on_tile_done=on_tile_done, inputs=[Path(slide_path), *inputs]):
            if isinstance(res, BaseException):
                raise res
            return res
    finally:
        if own:
            executor.close()
        close_slides(str(slide_path))
    raise AssertionError("run_slides yields one outcome per slide")  # pragma: no cover


@dataclass(frozen=True)
class SlideItem:
    """One slide to run: ``path``, ``mpp`` (None: the slide's own or the run's default) and output ``name``."""

    path: Path
    mpp: float | None = None
    name: str | None = None


ItemT = TypeVar("ItemT")


@dataclass
class _InFlight(Generic[ItemT]):
    item: ItemT
    plan: SlidePlan
    futures: list
    remaining: int
    t0: float
    stats: list


def run_slides(items: Iterable[ItemT], out_dir: str | os.PathLike, predictor: TileModel, config: SegmentConfig,
               executor, *, backend: str = "auto", default_mpp: float | None = None, progress: bool = False,
               on_tile_done=None, inputs: list[Path] | None = None
               ) -> Iterator[tuple[ItemT, SlideResult | Exception]]:
    """The one slide run: prepare each slide, submit its tile batches to ``executor``, finish it when they are
    done; yields ``(item, SlideResult or the exception)`` as each slide ends.

    ``items`` have ``path``, ``mpp`` (None: ``default_mpp``) and ``name`` (output stem or None), e.g.
    :class:`SlideItem` or :class:`pronet_wsi.wsi.cohort.SlideItem`. The executor only runs batches
    (:class:`~pronet_wsi.wsi.tile_task.ThreadExecutor`, ``cluster.DaskExecutor``). One slide's failure (its
    exception is yielded) does not stop the others; an interrupt cancels every batch and returns when none runs.
    Several slides are in flight: the next slides' batches are queued while one is finished (at least two
    slides, batches for twice the executor's capacity, at most ``MAX_SLIDES_IN_FLIGHT`` slides).
    """
    import queue as queue_mod

    todo = list(items)
    protected = inputs if inputs is not None else [Path(it.path) for it in todo]  # type: ignore[attr-defined]
    active: dict[int, _InFlight[ItemT]] = {}
    owner: dict[int, int] = {}  # id(future) -> slide
    done: queue_mod.SimpleQueue = queue_mod.SimpleQueue()
    label = Path(todo[0].path).name if len(todo) == 1 else "tiles"  # type: ignore[attr-defined]
    bar = progress_bar(0, label, "tile", enabled=progress)
    counter = {"nuclei": 0, "mpx": 0.0, "t0": time.perf_counter()}
    next_id = 0

    def prepare(item):
        try:
            plan = prepare_slide(item.path, out_dir, predictor, config, backend=backend,
                                 mpp=item.mpp if item.mpp is not None else default_mpp, name=item.name,
                                 inputs=protected)
            if isinstance(plan, SlidePlan) and not plan.batches:
                try:
                    return finish_slide(plan, [], 0.0)
                finally:
                    plan.release()
            return plan
        except Exception as exc:  # this slide fails, the others go on
            return exc

    def admit():
        nonlocal next_id
        while todo and len(active) < MAX_SLIDES_IN_FLIGHT and (
                len(active) < 2 or sum(s.remaining for s in active.values()) < 2 * executor.capacity()):
            item = todo.pop(0)
            plan = prepare(item)
            if not isinstance(plan, SlidePlan):  # skipped, nothing to run, or failed
                yield item, plan
                continue
            bar.total += len(plan.tiles)
            bar.update(plan.n_resumed)
            futures = [executor.submit(plan.job, batch, predictor, on_tile_done) for batch in plan.batches]
            active[next_id] = _InFlight(item, plan, futures, len(futures), time.perf_counter(), [])
            for f in futures:
                owner[id(f)] = next_id
                f.add_done_callback(done.put)
            next_id += 1

    def on_progress(plan: SlidePlan, stats: list[dict]) -> None:
        counter["nuclei"] += sum(s["in_core"] for s in stats)
        counter["mpx"] += sum(plan.core_mpx[s["key"]] for s in stats)
        rate = counter["mpx"] / max(time.perf_counter() - counter["t0"], 1e-9)
        bar.set_postfix_str(f"{counter['nuclei']:,} nuclei, {rate:.2f} Mpx/s", refresh=False)
        bar.update(len(stats))

    def end(sid: int) -> None:
        slide = active.pop(sid)
        try:
            executor.cancel(slide.futures)
        finally:
            slide.plan.release()

    try:
        yield from admit()
        while active:
            try:
                fut = done.get(timeout=0.2)  # a timeout keeps Ctrl-C responsive
            except queue_mod.Empty:
                continue
            sid = owner.pop(id(fut), -1)
            slide = active.get(sid)
            if slide is None or fut.cancelled():  # a cancelled batch of a slide that failed
                continue
            try:
                res = executor.result(fut)
            except Exception as exc:
                end(sid)
                yield slide.item, exc
                yield from admit()
                continue
            slide.stats.extend(res)
            slide.remaining -= 1
            on_progress(slide.plan, res)
            if slide.remaining:
                continue
            del active[sid]
            yield from admit()  # queue the next slides' tiles before this one's (serial) second pass
            outcome: SlideResult | Exception
            try:
                outcome = finish_slide(slide.plan, slide.stats, time.perf_counter() - slide.t0)
            except Exception as exc:
                outcome = exc
            finally:
                slide.plan.release()
            yield slide.item, outcome
    finally:
        bar.close()
        for sid in list(active):
            end(sid)


def suggest_slide(slide_path: str | Path, out_path: str | Path, predictor, config: SuggestConfig = SuggestConfig(),
                  *, backend: str = "auto", mpp: float | None = None, batch_size: int = 4) -> dict:
    """Score candidate boxes of one slide and write ``out_path`` (QuPath GeoJSON; see :mod:`pronet_wsi.suggest`).

    Open the slide, find its tissue, read each candidate box at the model's mpp, run it as it is and mirrored,
    score it (:func:`~pronet_wsi.suggest.score_box`) and write the picks. Returns a summary dict.
    """
    import numpy as np

    from pronet_wsi.geometry import Box
    from pronet_wsi.suggest import candidate_centres, score_box, suggestions, write_suggestions

    slide_path = Path(slide_path)
    with open_slide(slide_path, backend, mpp) as slide:
        check_scale(slide.mpp, predictor.mpp, f"{slide_path} ({slide.mpp_source})")
        thumb, ds = slide.thumbnail(2048)
        mask = tissue_mask(thumb, ds * slide.mpp)
        side0 = config.region_um / slide.mpp  # level-0 px
        side = int(round(config.region_um / predictor.mpp))  # model px
        h, w = slide.shape
        centres = candidate_centres(mask, ds, config.candidates)
        centres = np.clip(centres, side0 / 2, [max(w - side0 / 2, side0 / 2), max(h - side0 / 2, side0 / 2)])
        boxes = [Box(x - side0 / 2, y - side0 / 2, x + side0 / 2, y + side0 / 2) for x, y in centres]
        scores, colours, maps_plain, pixels = [], [], [], []
        for start in range(0, len(boxes), batch_size):
            tiles = np.stack([slide.read_box(b, (side, side)) for b in boxes[start:start + batch_size]])
            views = predictor.predict_batch(np.concatenate([tiles, tiles[:, :, ::-1]]))
            m = len(tiles)
            for j in range(m):
                plain = {k: v[j] for k, v in views.items()}
                scores.append(score_box(plain, {"foreground": views["foreground"][m + j][:, ::-1]},
                                        predictor.postprocess_config, tiles[j]))
                colours.append(tiles[j].reshape(-1, 3).mean(0))
                maps_plain.append(plain)
                pixels.append(tiles[j])
    classes = tuple(getattr(predictor, "classes", ()))
    features, summary = suggestions(slide_path.stem, boxes, scores, np.array(colours).reshape(-1, 3), maps_plain,
                                    side, config, predictor.postprocess_config, classes,
                                    getattr(predictor, "class_colors", ()), pixels)
    write_suggestions(out_path, features)
    return {"slide": str(slide_path), **summary}


def ids_key(plan: SlidePlan) -> str:
    """What feature ids derive from: the output name, the model and every setting that changes the nuclei, so a
    rerun with the same ones gives the same ids and one with another model new ids (QuPath merges by id)."""
    import hashlib
    import json

    settings = {"model": plan.model.id, "postprocess": plan.model.postprocess, "tiling": asdict(plan.config.tiling),
                "stitch": asdict(plan.config.stitch), "mpp": plan.slide.mpp, "tta": plan.job.fingerprint.get("tta")}
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{plan.slide.name}/{digest}"


def _model_id(predictor) -> str:
    """The model's identity by content (weights sha256, network config, thresholds), not by folder or mtime, so a
    copied model folder resumes and keeps the feature ids; objects without a folder go by their name."""
    from pronet_wsi.model import model_identity

    bundle = getattr(predictor, "bundle", None)
    path = getattr(bundle, "path", None) or getattr(predictor, "model_dir", None)
    if path is not None:
        return model_identity(Path(path))
    return getattr(predictor, "name", type(predictor).__name__)


def _class_counts(classes: tuple[str, ...], counts: list[int], tissue_mm2: float) -> dict:
    """Per-class nucleus counts and densities (per mm^2 of tissue) for the run record; {} for an untyped model."""
    return {name: {"nuclei": int(n), "per_mm2": round(n / tissue_mm2, 3) if tissue_mm2 else None}
            for name, n in zip(classes, counts, strict=True)}


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

