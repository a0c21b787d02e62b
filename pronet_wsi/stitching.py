"""Stitching: which tile's view of each nucleus to keep, so that no nucleus is kept twice or lost at a seam.

Each tile offers as candidates the nuclei whose centre lies in its core grown by the match radius
(:func:`pronet_wsi.instances.tile_instances`). Two neighbouring tiles' candidates are views of the same nucleus
when their centres are mutual nearest neighbours within the match radius, or when their outlines overlap by at
least half of the smaller one (a nucleus near a tile edge can be outlined alike by both tiles while its centre
moves by more than the radius). Of two such views the one with the higher priority (centre farther from its
tile's edge, i.e. more context; ties go to the tile earlier in raster order) wins, unless a third view beats the
winner in turn (:class:`Resolver`). A candidate that no neighbour's candidate claims is kept: inside its own
core it is that tile's alone (the cores partition the slide), and just outside it the neighbour saw the nucleus
elsewhere or not at all, so dropping it would lose it.

With identical predictions in the overlap (an oracle model) the result is exactly the untiled one. Pure
functions on arrays; the streaming driver lives in :mod:`pronet_wsi.wsi.assemble`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import shapely
from scipy.spatial import cKDTree

from pronet_wsi.errors import InputError
from pronet_wsi.instances import Instances


@dataclass(frozen=True)
class StitchConfig:
    """How two tiles' views of a nucleus are recognised as one.

    match_radius_px : two tiles' centres within this distance (processing px) can be the same nucleus; tiles
        also offer candidates this far beyond their core.
    min_overlap : two outlines overlapping by at least this fraction of the smaller one are the same nucleus.
    """

    match_radius_px: float = 8.0
    min_overlap: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 < self.match_radius_px <= 64.0:
            raise InputError(f"match_radius_px={self.match_radius_px}: must be in (0, 64]")
        if not 0.0 < self.min_overlap <= 1.0:
            raise InputError(f"min_overlap={self.min_overlap}: must be in (0, 1]")


@dataclass(frozen=True)
class Candidates:
    """The part of a tile's :class:`Instances` stitching needs.

    order : (int) the tile's raster-order rank (tie-break: lower wins).
    centers_xy : (N, 2) float64 level-0 centres; priority : (N,) float64.
    coords, offsets : the outlines as in :class:`Instances` (optional: without them only centres match).
    """

    order: int
    centers_xy: np.ndarray
    priority: np.ndarray
    coords: np.ndarray | None = None
    offsets: np.ndarray | None = None

    @classmethod
    def of(cls, order: int, inst: Instances) -> Candidates:
        return cls(order, inst.centers_xy, inst.priority, inst.coords, inst.offsets)

    @cached_property
    def polygons(self) -> np.ndarray | None:
        """(N,) shapely Polygons of the outlines, or None without outlines."""
        if self.coords is None or self.offsets is None:
            return None
        if len(self.offsets) < 2:
            return np.zeros(0, object)
        ring_of = np.repeat(np.arange(len(self.offsets) - 1), np.diff(self.offsets))
        return shapely.polygons(shapely.linearrings(self.coords, indices=ring_of))


def mutual_matches(a_xy: np.ndarray, b_xy: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(i, j)`` where ``a_xy[i]`` and ``b_xy[j]`` are each other's nearest point within ``radius``.

    Returns two (K,) int64 index arrays.
    """
    if len(a_xy) == 0 or len(b_xy) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    d_ab, j = cKDTree(b_xy).query(a_xy, distance_upper_bound=radius)
    d_ba, i = cKDTree(a_xy).query(b_xy, distance_upper_bound=radius)
    ia = np.nonzero(np.isfinite(d_ab))[0]
    ja = j[ia]
    mutual = i[ja] == ia
    return ia[mutual].astype(np.int64), ja[mutual].astype(np.int64)


def overlap_matches(a: np.ndarray, b: np.ndarray, min_overlap: float) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(i, j)`` of polygons ``a[i]``, ``b[j]`` overlapping by >= ``min_overlap`` of the smaller one's area.

    Returns two (K,) int64 index arrays.
    """
    if len(a) == 0 or len(b) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    # only outlines inside the other set's extent can overlap: test those (the strip along the shared seam)
    ea, eb = shapely.total_bounds(a), shapely.total_bounds(b)
    sa = np.nonzero(_within(shapely.bounds(a), eb))[0]
    sb = np.nonzero(_within(shapely.bounds(b), ea))[0]
    if len(sa) == 0 or len(sb) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    ia, jb = shapely.STRtree(b[sb]).query(a[sa], predicate="intersects")
    ia, jb = sa[ia], sb[jb]
    try:
        inter = shapely.area(shapely.intersection(a[ia], b[jb]))
    except shapely.errors.GEOSException:  # a self-touching outline: repair, then measure
        inter = shapely.area(shapely.intersection(shapely.make_valid(a[ia]), shapely.make_valid(b[jb])))
    smaller = np.minimum(shapely.area(a[ia]), shapely.area(b[jb]))
    ok = inter >= min_overlap * smaller
    return ia[ok].astype(np.int64), jb[ok].astype(np.int64)


def _near(xy: np.ndarray, other: np.ndarray, margin: float) -> np.ndarray:
    """Indices of the points of ``xy`` inside the bounding box of ``other`` grown by ``margin``."""
    if len(xy) == 0 or len(other) == 0:
        return np.zeros(0, np.int64)
    lo, hi = other.min(0) - margin, other.max(0) + margin
    return np.nonzero(((xy >= lo) & (xy <= hi)).all(1))[0]


def _within(bounds: np.ndarray, extent: np.ndarray) -> np.ndarray:
    """(N,) bool: boxes ``(x0, y0, x1, y1)`` that intersect ``extent``."""
    return ((bounds[:, 0] <= extent[2]) & (bounds[:, 2] >= extent[0]) & (bounds[:, 1] <= extent[3])
            & (bounds[:, 3] >= extent[1]))


def conflicts(a: Candidates, b: Candidates, radius_level0: float, min_overlap: float
              ) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(i, j)``: ``a``'s candidate i and ``b``'s candidate j are views of one nucleus.

    Mutual nearest centres within ``radius_level0``, or (when both carry outlines) outlines overlapping by at
    least ``min_overlap`` of the smaller one. Returns two (K,) int64 index arrays, each pair once.
    """
    # a centre can only match centres within the radius of the other tile's centres: match those alone
    sa, sb = _near(a.centers_xy, b.centers_xy, radius_level0), _near(b.centers_xy, a.centers_xy, radius_level0)
    ia, jb = mutual_matches(a.centers_xy[sa], b.centers_xy[sb], radius_level0)
    ia, jb = sa[ia], sb[jb]
    if a.polygons is not None and b.polygons is not None:
        oa, ob = overlap_matches(a.polygons, b.polygons, min_overlap)
        pairs = np.unique(np.stack([np.concatenate([ia, oa]), np.concatenate([jb, ob])], 1), axis=0)
        ia, jb = pairs[:, 0], pairs[:, 1]
    return ia.astype(np.int64), jb.astype(np.int64)


class Resolver:
    """Stitch decisions over a set of tiles, computing each pair of neighbours' conflicts once.

    A candidate is *beaten* when a neighbour's view of the same nucleus has a higher priority (ties: the tile
    earlier in raster order wins). It is dropped when one of the views that beat it is not beaten itself; so
    when tile B's view merges two nuclei that tile A splits, and A's view of one of them beats B's merged view,
    A keeps both halves instead of losing the other one (a greedy choice by priority, exact for chains of two).

    Parameters
    ----------
    candidates : tile key -> :class:`Candidates` (None: tile not processed). Called at most once per key
        between :meth:`forget` calls.
    neighbours : tile key -> keys of the tiles around it.
    radius_level0, min_overlap : as in :func:`conflicts`.
    """

    def __init__(self, candidates, neighbours, radius_level0: float, min_overlap: float = 0.5) -> None:
        self._load, self._neighbours = candidates, neighbours
        self.radius, self.min_overlap = radius_level0, min_overlap
        self._cands: dict = {}
        self._pairs: dict = {}
        self._beaten: dict = {}

    def _get(self, key) -> Candidates | None:
        if key not in self._cands:
            self._cands[key] = self._load(key)
        return self._cands[key]

    def _need(self, key) -> Candidates:
        """The candidates of tile ``key``, which must exist (a tile being resolved, or a present neighbour)."""
        cands = self._get(key)
        assert cands is not None, f"no candidates for tile {key!r}"
        return cands

    def _losses(self, key, nb_key) -> tuple[np.ndarray, np.ndarray]:
        """(i, j) pairs where ``key``'s candidate i is beaten by ``nb_key``'s candidate j."""
        if (key, nb_key) not in self._pairs:
            a, b = self._need(key), self._need(nb_key)
            ia, jb = conflicts(a, b, self.radius, self.min_overlap)
            pa, pb = a.priority[ia], b.priority[jb]
            a_loses = (pb > pa) | ((pb == pa) & (b.order < a.order))
            self._pairs[(key, nb_key)] = (ia[a_loses], jb[a_loses])
            self._pairs[(nb_key, key)] = (jb[~a_loses], ia[~a_loses])
        return self._pairs[(key, nb_key)]

    def _present(self, key) -> list:
        return [k for k in self._neighbours(key) if self._get(k) is not None]

    def beaten(self, key) -> np.ndarray:
        """(N,) bool: candidates of tile ``key`` that some neighbour's view beats."""
        if key not in self._beaten:
            out = np.zeros(len(self._need(key).centers_xy), bool)
            for nb in self._present(key):
                out[self._losses(key, nb)[0]] = True
            self._beaten[key] = out
        return self._beaten[key]

    def keep(self, key) -> np.ndarray:
        """(N,) bool: which of tile ``key``'s candidates to keep."""
        keep = np.ones(len(self._need(key).centers_xy), bool)
        for nb in self._present(key):
            i, j = self._losses(key, nb)
            keep[i[~self.beaten(nb)[j]]] = False
        return keep

    def forget(self, keys) -> None:
        """Drop what is cached about ``keys`` (tiles no longer needed)."""
        keys = set(keys)
        for k in keys:
            self._cands.pop(k, None)
            self._beaten.pop(k, None)
        self._pairs = {p: v for p, v in self._pairs.items() if p[0] not in keys and p[1] not in keys}


def keep_mask(tile: Candidates, neighbours: list[Candidates], radius_level0: float,
              min_overlap: float = 0.5) -> np.ndarray:
    """(N,) bool: which of ``tile``'s candidates to keep, all the views given being each other's neighbours.

    Parameters
    ----------
    radius_level0 : the match radius in level-0 px (``match_radius_px * frame.scale``).
    min_overlap : outlines overlapping by this fraction of the smaller one are one nucleus.
    """
    views = [tile, *neighbours]
    keys = range(len(views))
    return Resolver(views.__getitem__, lambda k: [o for o in keys if o != k], radius_level0, min_overlap).keep(0)


def stitch(tiles: list[tuple[tuple[int, int], Instances]], radius_level0: float,
           min_overlap: float = 0.5) -> Instances:
    """Stitch in memory (small regions, tests): tiles as ``((row, col), Instances)`` in raster order.

    Returns the kept nuclei concatenated in tile order (their global ids are their positions + 1).
    """
    by_index = {idx: Candidates.of(k, inst) for k, (idx, inst) in enumerate(tiles)}

    def around(idx):
        r, c = idx
        return [(r + dr, c + dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if dr or dc]

    resolver = Resolver(by_index.get, around, radius_level0, min_overlap)
    return concat([inst.select(resolver.keep(idx)) for idx, inst in tiles])


def concat(parts: list[Instances]) -> Instances:
    """Concatenate :class:`Instances` (all with or all without masks)."""
    parts = [p for p in parts if len(p)] or parts[:1]
    if not parts:
        return Instances.empty()
    shifts = np.cumsum([0] + [len(p.coords) for p in parts[:-1]])
    offsets = np.concatenate([[0]] + [p.offsets[1:] + s for p, s in zip(parts, shifts, strict=True)])
    bbox: np.ndarray | None = None
    bits: np.ndarray | None = None
    bit_offsets: np.ndarray | None = None
    if all(p.bbox is not None for p in parts):
        masks = [_mask_arrays(p) for p in parts]
        bshift = np.cumsum([0] + [len(m_bits) for _, m_bits, _ in masks[:-1]])
        bbox = np.concatenate([m_bbox for m_bbox, _, _ in masks]).reshape(-1, 4)
        bits = np.concatenate([m_bits for _, m_bits, _ in masks])
        bit_offsets = np.concatenate([[0]] + [m_offsets[1:] + s
                                              for (_, _, m_offsets), s in zip(masks, bshift, strict=True)]
                                     ).astype(np.int64)
    return Instances(centers_xy=np.concatenate([p.centers_xy for p in parts]).reshape(-1, 2),
                     priority=np.concatenate([p.priority for p in parts]),
                     in_core=np.concatenate([p.in_core for p in parts]),
                     area_px=np.concatenate([p.area_px for p in parts]),
                     area_um2=np.concatenate([p.area_um2 for p in parts]),
                     center_score=np.concatenate([p.center_score for p in parts]),
                     foreground_mean=np.concatenate([p.foreground_mean for p in parts]),
                     coords=np.concatenate([p.coords for p in parts]).reshape(-1, 2),
                     offsets=offsets.astype(np.int64), bbox=bbox, bits=bits, bit_offsets=bit_offsets,
                     class_index=_joined([p.class_index for p in parts]),
                     class_prob=_joined([p.class_prob for p in parts]),
                     features=_joined([p.features for p in parts]), feature_names=parts[0].feature_names,
                     **_joined_cells(parts))


def _joined(arrays: list) -> np.ndarray | None:
    """The arrays concatenated, or None when any part lacks them."""
    return None if any(a is None for a in arrays) else np.concatenate(arrays)


def _joined_cells(parts: list[Instances]) -> dict:
    """``cell_coords`` / ``cell_offsets`` of the parts joined ({} when a part has no cells)."""
    rings = [(p.cell_coords, p.cell_offsets) for p in parts]
    if any(c is None or o is None for c, o in rings):
        return {}
    coords = [np.asarray(c) for c, _ in rings]
    offs = [np.asarray(o) for _, o in rings]
    shifts = np.cumsum([0] + [len(c) for c in coords[:-1]])
    offsets = np.concatenate([np.zeros(1, np.int64)] + [o[1:] + s for o, s in zip(offs, shifts, strict=True)])
    return {"cell_coords": np.concatenate(coords).reshape(-1, 2), "cell_offsets": offsets.astype(np.int64)}


def _mask_arrays(inst: Instances) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(bbox, bits, bit_offsets)`` of instances that carry masks."""
    assert inst.bbox is not None and inst.bits is not None and inst.bit_offsets is not None, "instances without masks"
    return inst.bbox, inst.bits, inst.bit_offsets
