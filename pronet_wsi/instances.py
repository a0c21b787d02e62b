"""One results type for nuclei: centres, polygons and measurements, columnar (one row per nucleus).

:func:`tile_instances` turns one tile's :class:`~pronet_wsi.postprocess.Segmentation` into the candidates that
tile offers for stitching: every instance whose centre lies in the tile's core grown by the match radius, with
a valid QuPath-ready polygon in level-0 pixels. Pure numpy/shapely; no files.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numba
import numpy as np
import shapely

from pronet_wsi.cells import expand_labels, fit_cells
from pronet_wsi.geometry import Box, Frame, rc_to_xy
from pronet_wsi.measurements import MeasureConfig, label_sums, shape_measurements, stain_stats
from pronet_wsi.postprocess import Segmentation
from pronet_wsi.texts import member_texts, ring_texts_rounded

SIMPLIFY_PX = 0.5
GRID_PX = 0.01


MEASUREMENT_NAMES = {"area_um2": "Area µm^2", "area_px": "Area px^2", "center_score": "Center score",
                     "foreground_mean": "Foreground probability", "class_prob": "Class probability"}


@dataclass(frozen=True)
class Instances:
    """Nuclei, one row each. All coordinates level-0 ``(x, y)`` px (QuPath frame) unless stated.

    centers_xy : (N, 2) float64, predicted nucleus centre (pixel-centre convention).
    priority : (N,) float64, distance in processing px from the centre to the edge of the tile that saw it
        (larger = more context; used to choose between two tiles' views of one nucleus).
    in_core : (N,) bool, centre inside the tile's core.
    area_px : (N,) float64, area in level-0 px^2 (pixel count times scale^2).
    area_um2 : (N,) float64, area in um^2.
    center_score : (N,) float32, centre-heatmap value at the centre.
    foreground_mean : (N,) float32, mean foreground probability over the nucleus.
    coords : (M, 2) float64, polygon exterior rings (closed) concatenated; ring i is
        ``coords[offsets[i]:offsets[i + 1]]``.
    offsets : (N + 1,) int64.
    masks : optional per-nucleus masks for label images: ``bbox`` (N, 4) int64 ``(r0, c0, r1, c1)`` in the
        processing frame and ``bits`` packed bits with ``bit_offsets`` (N + 1,) int64 (see :meth:`mask`).
    class_index : (N,) int16 class of each nucleus (index into the model's classes), None for an untyped model.
    class_prob : (N,) float32 mean probability of that class over the nucleus, None for an untyped model.
    features : (N, K) float64 QuPath measurements named by ``feature_names`` (:mod:`pronet_wsi.measurements`),
        NaN where undefined; None when none were made.
    cell_coords, cell_offsets : the cells' exterior rings as ``coords`` / ``offsets`` (``--cells``), else None.
    """

    centers_xy: np.ndarray
    priority: np.ndarray
    in_core: np.ndarray
    area_px: np.ndarray
    area_um2: np.ndarray
    center_score: np.ndarray
    foreground_mean: np.ndarray
    coords: np.ndarray
    offsets: np.ndarray
    bbox: np.ndarray | None = None
    bits: np.ndarray | None = None
    bit_offsets: np.ndarray | None = None
    class_index: np.ndarray | None = None
    class_prob: np.ndarray | None = None
    features: np.ndarray | None = None
    feature_names: tuple[str, ...] = ()
    cell_coords: np.ndarray | None = None
    cell_offsets: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.centers_xy)

    def polygon(self, i: int) -> np.ndarray:
        """(K, 2) closed exterior ring of nucleus ``i``."""
        return self.coords[self.offsets[i] : self.offsets[i + 1]]

    def cell(self, i: int) -> np.ndarray:
        """(K, 2) closed exterior ring of the cell of nucleus ``i`` (instances with cells only)."""
        assert self.cell_coords is not None and self.cell_offsets is not None, "no cells stored"
        return self.cell_coords[self.cell_offsets[i] : self.cell_offsets[i + 1]]

    def mask(self, i: int) -> np.ndarray:
        """(h, w) bool mask of nucleus ``i`` inside its ``bbox`` (processing frame)."""
        assert self.bbox is not None and self.bits is not None and self.bit_offsets is not None, "no masks stored"
        r0, c0, r1, c1 = (int(v) for v in self.bbox[i])
        n = (r1 - r0) * (c1 - c0)
        packed = self.bits[self.bit_offsets[i] : self.bit_offsets[i + 1]]
        return np.unpackbits(packed, count=n).astype(bool).reshape(r1 - r0, c1 - c0)

    def select(self, keep: np.ndarray) -> Instances:
        """The rows where ``keep`` (bool (N,) or index array) is set, in order."""
        idx = np.nonzero(keep)[0] if np.asarray(keep).dtype == bool else np.asarray(keep, np.int64)
        lens = np.diff(self.offsets)[idx]
        take = np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in idx]) if len(idx) else \
            np.zeros(0, np.int64)
        bbox: np.ndarray | None = None
        bits: np.ndarray | None = None
        bit_offsets: np.ndarray | None = None
        if self.bbox is not None:
            assert self.bits is not None and self.bit_offsets is not None
            blens = np.diff(self.bit_offsets)[idx]
            btake = (np.concatenate([np.arange(self.bit_offsets[i], self.bit_offsets[i + 1]) for i in idx])
                     if len(idx) else np.zeros(0, np.int64))
            bbox, bits = self.bbox[idx], self.bits[btake]
            bit_offsets = np.concatenate([[0], np.cumsum(blens)]).astype(np.int64)
        cells: dict = {}
        if self.cell_coords is not None and self.cell_offsets is not None:
            cells = dict(zip(("cell_coords", "cell_offsets"), _take_rings(self.cell_coords, self.cell_offsets, idx),
                             strict=True))
        return Instances(self.centers_xy[idx], self.priority[idx], self.in_core[idx], self.area_px[idx],
                         self.area_um2[idx], self.center_score[idx], self.foreground_mean[idx],
                         self.coords[take].reshape(-1, 2), np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
                         bbox=bbox, bits=bits, bit_offsets=bit_offsets,
                         class_index=None if self.class_index is None else self.class_index[idx],
                         class_prob=None if self.class_prob is None else self.class_prob[idx],
                         features=None if self.features is None else self.features[idx],
                         feature_names=self.feature_names, **cells)

    def geometry_texts(self) -> list[str]:
        """The GeoJSON ``coordinates`` of every nucleus (one ring, rounded to 0.01 px) as text."""
        return ring_texts(self.coords, self.offsets)

    def cell_texts(self) -> list[str]:
        """The GeoJSON ``coordinates`` of every nucleus's cell as text (instances with cells only)."""
        assert self.cell_coords is not None and self.cell_offsets is not None, "no cells stored"
        return ring_texts(self.cell_coords, self.cell_offsets)

    def measurement_columns(self) -> list[tuple[str, np.ndarray, int]]:
        """(QuPath-style name as its own detections write it, values of every nucleus, decimals kept)."""
        cols = [(MEASUREMENT_NAMES["area_um2"], self.area_um2, 3), (MEASUREMENT_NAMES["area_px"], self.area_px, 2),
                (MEASUREMENT_NAMES["center_score"], self.center_score, 4),
                (MEASUREMENT_NAMES["foreground_mean"], self.foreground_mean, 4)]
        if self.class_prob is not None:
            cols.append((MEASUREMENT_NAMES["class_prob"], self.class_prob, 4))
        if self.features is not None:
            cols += [(name, self.features[:, j], 4) for j, name in enumerate(self.feature_names)]
        return cols

    def measurements(self, i: int) -> dict[str, float]:
        """QuPath-style measurement names -> values of nucleus ``i``; non-finite ones left out (QuPath shows a
        missing measurement as NaN, a written 0.0 would be a wrong number)."""
        out = {}
        for name, col, nd in self.measurement_columns():
            v = float(col[i])
            if math.isfinite(v):
                out[name] = round(v, nd)
        return out

    def measurement_texts(self) -> list[str]:
        """The JSON members of each nucleus's ``measurements`` object (``"name":value,...``), the values of
        :meth:`measurements`, written for all nuclei at once (:func:`~pronet_wsi.texts.member_texts`)."""
        return member_texts(self.measurement_columns(), len(self))

    @classmethod
    def empty(cls, with_masks: bool = False, typed: bool = False, measure: MeasureConfig | None = None
              ) -> Instances:
        z = np.zeros(0)
        names = measure.names if measure is not None else ()
        cells = measure is not None and measure.cells_um > 0
        return cls(np.zeros((0, 2)), z, np.zeros(0, bool), z, z, np.zeros(0, np.float32), np.zeros(0, np.float32),
                   np.zeros((0, 2)), np.zeros(1, np.int64),
                   bbox=np.zeros((0, 4), np.int64) if with_masks else None,
                   bits=np.zeros(0, np.uint8) if with_masks else None,
                   bit_offsets=np.zeros(1, np.int64) if with_masks else None,
                   class_index=np.zeros(0, np.int16) if typed else None,
                   class_prob=np.zeros(0, np.float32) if typed else None,
                   features=np.zeros((0, len(names))) if names else None, feature_names=names,
                   cell_coords=np.zeros((0, 2)) if cells else None,
                   cell_offsets=np.zeros(1, np.int64) if cells else None)


def tile_instances(seg: Segmentation, foreground: np.ndarray, read: Box, core: Box, frame: Frame, model_mpp: float,
                   match_radius_px: float, *, with_masks: bool = False, clip: Box | None = None,
                   image: np.ndarray | None = None, measure: MeasureConfig | None = None) -> Instances:
    """Candidates of one tile: instances whose centre lies in ``core`` grown by ``match_radius_px``.

    Parameters
    ----------
    seg : the tile's post-processed instances (tile-local labels, (row, col) centres and their scores).
    foreground : (H, W) float32 foreground probability.
    read, core : the tile's read and core boxes in the processing frame.
    frame : the slide's processing frame (scale to level 0).
    model_mpp : um per processing px.
    match_radius_px : candidates reach this far (processing px) beyond the core.
    with_masks : also keep each nucleus's pixel mask (for ``--labels-zarr``).
    clip : level-0 box the polygons must stay inside (the slide); default: ``frame.level0_shape``.
    image : (H, W, 3) uint8, the tile as the model saw it (needed for stain measurements).
    measure : the QuPath measurements and cells to make (default: none, no cells).

    Returns
    -------
    :class:`Instances` sorted by centre (y, then x); nuclei whose polygon collapses are dropped. ``area_px`` is
    the polygon's (shoelace) area, ``area_um2`` that times the level-0 pixel area.
    """
    measure = measure or MeasureConfig(level="none")
    labels, centers_rc, center_scores = seg.labels, seg.centers_rc, seg.center_scores
    n = len(centers_rc)
    typed = seg.type_probs is not None
    empty = Instances.empty(with_masks, typed, measure)
    if n == 0:
        return empty
    centers_p = rc_to_xy(centers_rc, (read.x0, read.y0))  # processing frame
    cand = core.expand(match_radius_px).contains_xy(centers_p)
    # pixel counts, foreground sums and bounding boxes of every label in one pass
    pixels, fg_sums, boxes = label_sums(labels, n, foreground)
    cells = measure.cells_um > 0
    ids = np.nonzero((pixels[1:] > 0) & (cand | cells))[0] + 1  # with cells: every nucleus (its neighbours count)
    if not cand[ids - 1].any():
        return empty
    bbox = boxes[ids]
    lab = np.ascontiguousarray(labels)  # int32 from postprocess: the kernels take it as it is
    if clip is None:
        clip = Box(0, 0, frame.level0_shape[1], frame.level0_shape[0])
    polys = _outlines(lab, ids, bbox, read, frame, clip)
    alive = ~shapely.is_empty(polys)
    ids, bbox, polys = ids[alive], bbox[alive], polys[alive]
    cell_polys = None
    if cells:
        cell_lab = expand_labels(lab, measure.cells_um / model_mpp)
        raw = _outlines(cell_lab, ids, label_sums(cell_lab, n, foreground)[2][ids], read, frame, clip)
        cell_polys = fit_cells(polys, raw, frame.to_level0(centers_p[ids - 1]))
        keep = cand[ids - 1]
        ids, bbox, polys, cell_polys = ids[keep], bbox[keep], polys[keep], cell_polys[keep]
    if len(ids) == 0:
        return empty
    counts, fg_sum = pixels[ids].astype(np.float64), fg_sums[ids]
    c_p = centers_p[ids - 1]
    order = np.lexsort((c_p[:, 0], c_p[:, 1]))
    ids, bbox, polys, counts, fg_sum, c_p = ids[order], bbox[order], polys[order], counts[order], fg_sum[order], \
        c_p[order]
    ring_coords, ring_offsets = _exterior_arrays(polys)
    extra: dict = {}
    if with_masks:
        packed = [np.packbits(lab[r0:r1, c0:c1] == i) for i, (r0, c0, r1, c1) in zip(ids, bbox, strict=True)]
        extra = {"bbox": bbox + np.array([read.y0, read.x0, read.y0, read.x0], np.int64),
                 "bits": np.concatenate(packed) if packed else np.zeros(0, np.uint8),
                 "bit_offsets": np.concatenate([[0], np.cumsum([len(p) for p in packed])]).astype(np.int64)}
    if typed:
        extra["class_index"] = seg.class_index[ids - 1].astype(np.int16)
        extra["class_prob"] = seg.class_prob[ids - 1].astype(np.float32)
    um_per_px = model_mpp / frame.scale  # level-0 pixel size
    if cell_polys is not None:
        cell_polys = cell_polys[order]
        extra["cell_coords"], extra["cell_offsets"] = _exterior_arrays(cell_polys)
    if measure.names:
        cols = _measure(measure, ring_coords, ring_offsets, polys, cell_polys, um_per_px, image, lab,
                        cell_lab if cells else None, ids)
        extra["features"] = np.stack([cols[k] for k in measure.names], 1).astype(np.float64)
        extra["feature_names"] = measure.names
    area_px = shapely.area(polys)
    return Instances(
        centers_xy=frame.to_level0(c_p),
        priority=read.edge_distance(c_p),
        in_core=core.contains_xy(c_p),
        area_px=area_px,
        area_um2=area_px * um_per_px**2,
        center_score=np.asarray(center_scores, np.float32)[ids - 1],
        foreground_mean=(fg_sum / np.maximum(counts, 1)).astype(np.float32),
        coords=ring_coords,
        offsets=ring_offsets,
        **extra,
    )


def _outlines(lab: np.ndarray, ids: np.ndarray, bbox: np.ndarray, read: Box, frame: Frame, clip: Box) -> np.ndarray:
    """(N,) valid level-0 polygons of labels ``ids`` (empty where one collapses)."""
    if len(ids) == 0:
        return np.zeros(0, object)
    coords, offsets = _trace_outlines(lab, ids.astype(np.int64), bbox)
    rings = frame.to_level0(coords + np.array([read.x0, read.y0]))  # processing corners -> level 0
    return _clip_polygons(_valid_polygons(rings, offsets, frame.scale != 1.0), clip)


def _measure(measure: MeasureConfig, coords: np.ndarray, offsets: np.ndarray, polys: np.ndarray,
             cell_polys: np.ndarray | None, um_per_px: float, image: np.ndarray | None, lab: np.ndarray,
             cell_lab: np.ndarray | None, ids: np.ndarray) -> dict[str, np.ndarray]:
    """The columns of ``measure.names`` for the nuclei ``ids`` (see :mod:`pronet_wsi.measurements`)."""
    cols: dict[str, np.ndarray] = {}
    if measure.level in ("basic", "all"):
        cols.update(shape_measurements(coords, offsets, um_per_px))
    if cell_polys is not None:
        cell_area = shapely.area(cell_polys) * um_per_px**2
        nuc_area = cols["Nucleus: Area"] if cols else shapely.area(polys) * um_per_px**2
        cols["Cell: Area"] = cell_area
        cols["Cytoplasm: Area"] = np.maximum(cell_area - nuc_area, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            cols["Nucleus/Cell area ratio"] = np.minimum(nuc_area / cell_area, 1.0)
    if measure.level == "all":
        if image is None:
            raise ValueError("stain measurements need the tile image (tile_instances(image=...))")
        nucleus = stain_stats(lab, image, ids)
        cols["Nucleus: Hematoxylin OD mean"] = nucleus["h_mean"]
        cols["Nucleus: Hematoxylin OD std dev"] = nucleus["h_std"]
        cols["Nucleus: Hematoxylin OD max"] = nucleus["h_max"]
        cols["Nucleus: Eosin OD mean"] = nucleus["e_mean"]
        if cell_lab is not None:
            cols["Cell: Eosin OD mean"] = stain_stats(cell_lab, image, ids)["e_mean"]
            cols["Cytoplasm: Eosin OD mean"] = stain_stats(np.where(lab > 0, 0, cell_lab), image, ids)["e_mean"]
    return cols


def ring_json(ring: np.ndarray) -> str:
    """GeoJSON Polygon ``coordinates`` text of one closed ring, valid after rounding to 0.01 px."""
    return _ring_text(valid_rounded_ring(ring))


def ring_texts(coords: np.ndarray, offsets: np.ndarray) -> list[str]:
    """:func:`ring_json` of every ring of ragged ``coords`` / ``offsets``: the rounding and the validity check run
    on all rings at once; only a ring that rounding made invalid is repaired on its own."""
    n = len(offsets) - 1
    if n <= 0:
        return []
    rounded = np.round(np.asarray(coords, np.float64), 2)
    lens = np.diff(offsets)
    ok = lens >= 4
    if ok.any():
        idx = np.nonzero(ok)[0]
        sub_coords, sub_offsets = _take_rings(rounded, offsets, idx)
        polys = shapely.from_ragged_array(shapely.GeometryType.POLYGON, sub_coords,
                                          (sub_offsets, np.arange(len(idx) + 1, dtype=np.int64)))
        ok[idx] = shapely.is_valid(polys) & ~shapely.is_empty(polys)
    texts = ring_texts_rounded(coords, offsets, ok)
    return [texts[i] if ok[i] else ring_json(coords[offsets[i] : offsets[i + 1]]) for i in range(n)]


def _ring_text(ring: np.ndarray) -> str:
    if np.all(ring == np.rint(ring)):
        ring = ring.astype(np.int64)
    return json.dumps([ring.tolist()], separators=(",", ":"))


def _take_rings(coords: np.ndarray, offsets: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rings ``idx`` of ragged ``coords`` / ``offsets``, as new ragged arrays."""
    lens = np.diff(offsets)[idx]
    take = (np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in idx]) if len(idx)
            else np.zeros(0, np.int64))
    return coords[take].reshape(-1, 2), np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)


def valid_rounded_ring(ring: np.ndarray, decimals: int = 2) -> np.ndarray:
    """``ring`` rounded to ``decimals``, still a valid polygon (QuPath 0.6 rejects a whole file for one invalid
    polygon, and rounding can make a thin outline touch itself): repaired, else its convex hull."""
    out = np.round(ring, decimals)
    poly = shapely.Polygon(out)
    if poly.is_valid and not poly.is_empty:
        return out
    fixed = _largest_polygon(shapely.make_valid(poly))
    for cand in (fixed, shapely.Polygon(ring).convex_hull):
        if cand.is_empty or cand.geom_type != "Polygon":
            continue
        cand_ring = np.round(np.asarray(cand.exterior.coords), decimals)
        if shapely.Polygon(cand_ring).is_valid:
            return cand_ring
    c = np.round(np.asarray(ring).mean(0), decimals)  # a degenerate speck: a minimal square around its centre
    d = 10.0**-decimals
    return np.round(np.array([c + [-d, -d], c + [d, -d], c + [d, d], c + [-d, d], c + [-d, -d]]), decimals)


def _valid_polygons(coords: np.ndarray, offsets: np.ndarray, snap: bool) -> np.ndarray:
    """Closed rings -> valid simplified polygons (largest piece of make_valid), snapped to 0.01 px if ``snap``."""
    n = len(offsets) - 1
    polys = shapely.from_ragged_array(shapely.GeometryType.POLYGON, coords,
                                      (offsets, np.arange(n + 1, dtype=np.int64)))
    bad = ~shapely.is_valid(polys)
    if bad.any():
        polys[bad] = [_largest_polygon(g) for g in shapely.make_valid(polys[bad])]
    simple = shapely.simplify(polys, SIMPLIFY_PX, preserve_topology=False)
    broken = ~shapely.is_valid(simple) | shapely.is_empty(simple)
    if broken.any():
        simple[broken] = shapely.simplify(polys[broken], SIMPLIFY_PX, preserve_topology=True)
    polys = simple
    if snap:
        polys = _snap(polys)
    fix = ~shapely.is_empty(polys) & (shapely.get_type_id(polys) != 3)  # 3 = Polygon
    fix |= ~shapely.is_valid(polys)
    if fix.any():
        polys[fix] = [_largest_polygon(shapely.make_valid(g)) for g in polys[fix]]
    # drop holes: a nucleus outline is its exterior ring
    return shapely.polygons(shapely.get_exterior_ring(polys))


def _snap(polys: np.ndarray) -> np.ndarray:
    """Vertices rounded to the :data:`GRID_PX` grid (half up, as GEOS rounds), where that keeps a polygon valid;
    the rest through ``shapely.set_precision``, which repairs what rounding breaks. Rounding the coordinate arrays
    costs a few ms a tile where ``set_precision`` on every polygon cost ~30 us each (a fifth of the polygon stage
    of a slide whose pixel size is not the model's)."""
    scale = 1.0 / GRID_PX
    rounded = shapely.transform(polys, lambda c: np.floor(c * scale + 0.5) / scale)
    bad = ~shapely.is_valid(rounded) & ~shapely.is_empty(polys)
    if bad.any():
        rounded[bad] = shapely.set_precision(polys[bad], GRID_PX)
    return rounded


def _clip_polygons(polys: np.ndarray, clip: Box) -> np.ndarray:
    """Cut the polygons that reach outside ``clip`` (nuclei at the slide border) back to it."""
    b = shapely.bounds(polys)
    out = (b[:, 0] < clip.x0) | (b[:, 1] < clip.y0) | (b[:, 2] > clip.x1) | (b[:, 3] > clip.y1)
    if out.any():
        cut = shapely.intersection(polys[out], shapely.box(*clip.as_tuple()))
        polys[out] = [_largest_polygon(g) for g in cut]
    return polys


def _largest_polygon(geom) -> shapely.Geometry:
    """Largest Polygon in ``geom`` (an empty Polygon when there is none)."""
    if geom is None or geom.is_empty:
        return shapely.Polygon()
    if geom.geom_type == "Polygon":
        return geom
    parts = [g for g in getattr(geom, "geoms", []) if g.geom_type in ("Polygon", "MultiPolygon")]
    polys = [p for g in parts for p in (g.geoms if g.geom_type == "MultiPolygon" else [g])]
    return max(polys, key=lambda p: p.area) if polys else shapely.Polygon()


def _exterior_arrays(polys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exterior rings of Polygons -> (M, 2) coords and (N + 1,) offsets."""
    rings = shapely.get_exterior_ring(polys)
    coords, idx = shapely.get_coordinates(rings, return_index=True)
    counts = np.bincount(idx, minlength=len(polys))
    return coords, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


@numba.njit(cache=True)
def _inside(lab, y, x, ident):
    h, w = lab.shape
    return 0 <= y < h and 0 <= x < w and lab[y, x] == ident


@numba.njit(cache=True, nogil=True)
def _trace_outlines(lab, ids, bbox):
    """Outer boundary of each 4-connected instance, traced along pixel edges (crack following).

    Each corner of the pixel-edge outline is cut 0.5 px along both of its edges (the marching-squares
    outline at level 0.5), so one-pixel stairs become straight diagonals and two pixels that touch only at a
    corner do not make the ring touch itself. Points are ``(x, y)`` tile-local processing px; rings are closed.
    """
    dys = (0, 1, 0, -1)  # E, S, W, N: turning right is +1
    dxs = (1, 0, -1, 0)
    # ahead-left / ahead-right pixel offsets (row, col) from the vertex, per direction
    alr = (-1, 0, 0, -1)
    alc = (0, 0, -1, -1)
    arr_ = (0, 0, -1, -1)
    arc = (0, -1, -1, 0)
    cap = 64 * len(ids) + 16
    out = np.empty((cap, 2), np.float64)
    offsets = np.zeros(len(ids) + 1, np.int64)
    m = 0
    for k in range(len(ids)):
        ident = ids[k]
        r0 = bbox[k, 0]
        c0 = bbox[k, 1]
        while lab[r0, c0] != ident:
            c0 += 1
        y, x, d = r0, c0, 0
        start = m
        steps = 0
        limit = 4 * (bbox[k, 2] - bbox[k, 0] + 1) * (bbox[k, 3] - bbox[k, 1] + 1) + 8
        while True:
            y += dys[d]
            x += dxs[d]
            steps += 1
            a_r = _inside(lab, y + arr_[d], x + arc[d], ident)
            a_l = _inside(lab, y + alr[d], x + alc[d], ident)
            if not a_r:
                nd = (d + 1) % 4
            elif a_l:
                nd = (d + 3) % 4
            else:
                nd = d
            if nd != d:
                if m + 4 >= out.shape[0]:
                    bigger = np.empty((out.shape[0] * 2, 2), np.float64)
                    bigger[:m] = out[:m]
                    out = bigger
                px = x - 0.5 * dxs[d]
                py = y - 0.5 * dys[d]
                if m == start or out[m - 1, 0] != px or out[m - 1, 1] != py:
                    out[m, 0] = px
                    out[m, 1] = py
                    m += 1
                out[m, 0] = x + 0.5 * dxs[nd]
                out[m, 1] = y + 0.5 * dys[nd]
                m += 1
            d = nd
            if (y == r0 and x == c0 and d == 0) or steps > limit:
                break
        if out[m - 1, 0] != out[start, 0] or out[m - 1, 1] != out[start, 1]:
            out[m, 0] = out[start, 0]  # close the ring
            out[m, 1] = out[start, 1]
            m += 1
        offsets[k + 1] = m
    return out[:m].copy(), offsets
