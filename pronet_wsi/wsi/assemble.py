"""The second pass of a slide: stitch decisions over the finished tiles, then stream the outputs.

Pass 1 reads only the centres and outlines of each tile and its neighbours (a window of five tile rows) and
decides which candidates to keep (:class:`pronet_wsi.stitching.Resolver`). Global ids follow tile order, so
they are known before pass 2 streams the kept nuclei to the GeoJSON (and the label image and the overlay) tile by tile.
"""

from __future__ import annotations

import time

import numpy as np

from pronet_wsi.export import LabelsWriter, Overlay, SplitGeoJSONWriter, feature_text, nucleus_uuids
from pronet_wsi.stitching import Candidates, Resolver
from pronet_wsi.table import NucleiTableWriter
from pronet_wsi.tiling import Tile, TileGrid
from pronet_wsi.wsi.plan import SlidePlan
from pronet_wsi.wsi.tile_store import TileStore


def write_outputs(plan: SlidePlan, store: TileStore, ids_key: str) -> dict:
    """Stitch decisions (pass 1, centres and outlines), then stream GeoJSON / labels / overlay (pass 2).

    The parts of ``plan.tiles`` (raster order) are in ``store``; feature ids derive from ``ids_key`` (slide name,
    model and settings) and the nucleus number; stage times go into ``plan.log``. Returns counts (candidates,
    nuclei, duplicates removed), the summed ``area_um2`` of the kept nuclei (``area_um2_sum``) and the kept
    nuclei per class of a typed model (``class_counts``, a list in class order).
    """
    grid, tiles, frame, paths, config = plan.grid, plan.tiles, plan.frame, plan.paths, plan.config
    timings = plan.log.timings
    t = time.perf_counter()
    order = {tl.index: k for k, tl in enumerate(tiles)}

    def load(idx):
        return Candidates(order[idx], *store.load_candidates(tiles[order[idx]].key)) if idx in order else None

    resolver = Resolver(load, grid.neighbours, config.stitch.match_radius_px * frame.scale,
                        config.stitch.min_overlap)
    keep: dict[tuple[int, int], np.ndarray] = {}
    n_candidates = 0
    for tl in tiles:  # raster order; a decision needs tiles up to two rows away
        resolver.forget([i for i in order if i[0] < tl.index[0] - 2])
        keep[tl.index] = resolver.keep(tl.index)
        n_candidates += len(keep[tl.index])
    timings["stitch_s"] = time.perf_counter() - t
    t = time.perf_counter()
    gid_start, gid = {}, 0
    for tl in tiles:
        gid_start[tl.index] = gid
        gid += int(keep[tl.index].sum())
    overlay = Overlay(plan.overview.thumb, plan.overview.ds, plan.overview.mask)
    labels = None
    if config.labels_zarr:
        labels = LabelsWriter(paths.labels, frame.shape, grid.core_hw,
                              {"mpp": plan.model.mpp, "slide_mpp": plan.slide.mpp, "level0_px_per_px": frame.scale,
                               "description": "nucleus ids; id i is the i-th feature of the GeoJSON"})
    area_um2_sum = 0.0
    class_counts = np.zeros(len(plan.model.classes), np.int64)
    table = None
    if config.parquet:
        table = NucleiTableWriter(paths.table, plan.slide.mpp, config.measure.names, plan.model.classes,
                                  cells=config.measure.cells_um > 0)
    writer = SplitGeoJSONWriter(paths.geojson, config.gzip, config.max_features_per_file)
    try:
        for tl in tiles:
            km = keep[tl.index]
            texts = store.load_texts(tl.key)
            base = gid_start[tl.index]
            ids = nucleus_uuids(ids_key, base + 1, int(km.sum()))
            for fid, i in zip(ids, np.nonzero(km)[0], strict=True):
                writer.write(feature_text(fid, texts[i]))
            kept = store.load(tl.key).select(km)
            if table is not None:
                table.add(ids, kept)
            area_um2_sum += float(kept.area_um2.sum())
            if kept.class_index is not None and len(class_counts):
                class_counts += np.bincount(kept.class_index.astype(np.int64), minlength=len(class_counts))
            overlay.add(kept)
        if labels is not None:
            _paint_labels(labels, store, grid, tiles, order, keep, gid_start)
        writer.close()
        if table is not None:
            table.close()
        if labels is not None:
            labels.close()
    except BaseException:
        writer.abort()
        if table is not None:
            table.abort()
        if labels is not None:
            labels.abort()
        raise
    overlay.save(paths.overlay)
    timings["export_s"] = time.perf_counter() - t
    return {"candidates": n_candidates, "nuclei": gid, "duplicates_removed": n_candidates - gid,
            "area_um2_sum": area_um2_sum, "class_counts": class_counts.tolist(),
            "geojson_parts": [str(p) for p in writer.paths]}


def _paint_labels(labels: LabelsWriter, store: TileStore, grid: TileGrid, tiles: tuple[Tile, ...], order: dict,
                  keep: dict, gid_start: dict) -> None:
    """Write each core's chunk from the kept nuclei of its tile and its neighbours (first id wins overlaps)."""
    chunks = sorted({i for tl in tiles for i in [tl.index, *grid.neighbours(tl.index)]})
    cache: dict[tuple[int, int], tuple] = {}
    for idx in chunks:
        for old in [i for i in cache if i[0] < idx[0] - 1]:
            del cache[old]
        core = grid.tile(*idx).core
        y0, x0 = int(core.y0), int(core.x0)
        canvas = np.zeros(core.shape, np.uint32)
        owners = sorted(i for i in [idx, *grid.neighbours(idx)] if i in order)
        for i in owners:
            if i not in cache:
                inst = store.load(tiles[order[i]].key, masks=True).select(keep[i])
                cache[i] = (inst, gid_start[i] + 1 + np.arange(len(inst)))
        for i in owners:
            inst, gids = cache[i]
            for n in range(len(inst)):
                r0, c0, r1, c1 = (int(v) for v in inst.bbox[n])
                a0, b0, a1, b1 = max(r0, y0), max(c0, x0), min(r1, y0 + canvas.shape[0]), min(c1, x0 + canvas.shape[1])
                if a1 <= a0 or b1 <= b0:
                    continue
                m = inst.mask(n)[a0 - r0 : a1 - r0, b0 - c0 : b1 - c0]
                view = canvas[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0]
                view[m & (view == 0)] = gids[n]
        labels.write(y0, x0, canvas)
