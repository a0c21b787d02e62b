"""Stitching: which tile's view of each nucleus to keep, so that no nucleus is kept twice or lost at a seam.

Each tile offers as candidates the nuclei whose centre lies in its core grown by the match radius
(:func:`pronet_wsi.instances.tile_instances`). Two neighbouring tiles' candidates are the same nucleus when
their centres are mutual nearest neighbours within the match radius. Of such a pair, the view with the higher
priority (centre farther from its tile's edge, i.e. more context; ties go to the tile earlier in raster order)
is kept. A candidate no other tile matched is kept when its centre lies in its own tile's core (the cores
partition the slide, so exactly one tile owns it).

With identical predictions in the overlap (an oracle model) the result is exactly the untiled one. Pure
functions on arrays; the streaming driver lives in :mod:`pronet_wsi.pipeline`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from pronet_wsi.instances import Instances


@dataclass(frozen=True)
class StitchConfig:
    """match_radius_px : two tiles' centres within this distance (processing px) can be the same nucleus."""

    match_radius_px: float = 8.0

    def __post_init__(self) -> None:
        if not 0.0 < self.match_radius_px <= 64.0:
            raise ValueError(f"match_radius_px={self.match_radius_px}: must be in (0, 64]")


@dataclass(frozen=True)
class Candidates:
    """The part of a tile's :class:`Instances` stitching needs.

    order : (int) the tile's raster-order rank (tie-break: lower wins).
    centers_xy : (N, 2) float64 level-0 centres; priority : (N,) float64; in_core : (N,) bool.
    """

    order: int
    centers_xy: np.ndarray
    priority: np.ndarray
    in_core: np.ndarray

    @classmethod
    def of(cls, order: int, inst: Instances) -> Candidates:
        return cls(order, inst.centers_xy, inst.priority, inst.in_core)


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


def keep_mask(tile: Candidates, neighbours: list[Candidates], radius_level0: float) -> np.ndarray:
    """(N,) bool: which of ``tile``'s candidates to keep, given the candidates of its neighbour tiles.

    Parameters
    ----------
    radius_level0 : the match radius in level-0 px (``match_radius_px * frame.scale``).
    """
    n = len(tile.centers_xy)
    matched = np.zeros(n, bool)
    beaten = np.zeros(n, bool)
    for nb in neighbours:
        ia, jb = mutual_matches(tile.centers_xy, nb.centers_xy, radius_level0)
        if len(ia) == 0:
            continue
        matched[ia] = True
        pa, pb = tile.priority[ia], nb.priority[jb]
        loses = (pb > pa) | ((pb == pa) & (nb.order < tile.order))
        beaten[ia[loses]] = True
    return ~beaten & (matched | tile.in_core)


def stitch(tiles: list[tuple[tuple[int, int], Instances]], radius_level0: float) -> Instances:
    """Stitch in memory (small regions, tests): tiles as ``((row, col), Instances)`` in raster order.

    Returns the kept nuclei concatenated in tile order (their global ids are their positions + 1).
    """
    by_index = {idx: (k, inst) for k, (idx, inst) in enumerate(tiles)}
    kept = []
    for k, (idx, inst) in enumerate(tiles):
        r, c = idx
        nbs = [Candidates.of(by_index[(r + dr, c + dc)][0], by_index[(r + dr, c + dc)][1])
               for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr or dc) and (r + dr, c + dc) in by_index]
        kept.append(inst.select(keep_mask(Candidates.of(k, inst), nbs, radius_level0)))
    return concat(kept)


def concat(parts: list[Instances]) -> Instances:
    """Concatenate :class:`Instances` (all with or all without masks)."""
    parts = [p for p in parts if len(p)] or parts[:1]
    if not parts:
        return Instances.empty()
    shifts = np.cumsum([0] + [len(p.coords) for p in parts[:-1]])
    offsets = np.concatenate([[0]] + [p.offsets[1:] + s for p, s in zip(parts, shifts, strict=True)])
    extra = {}
    if all(p.bbox is not None for p in parts):
        bshift = np.cumsum([0] + [len(p.bits) for p in parts[:-1]])
        extra = {"bbox": np.concatenate([p.bbox for p in parts]).reshape(-1, 4),
                 "bits": np.concatenate([p.bits for p in parts]),
                 "bit_offsets": np.concatenate([[0]] + [p.bit_offsets[1:] + s
                                                         for p, s in zip(parts, bshift, strict=True)]).astype(np.int64)}
    cat = {f: np.concatenate([getattr(p, f) for p in parts])
           for f in ("priority", "in_core", "area_px", "area_um2", "center_score", "foreground_mean")}
    return Instances(centers_xy=np.concatenate([p.centers_xy for p in parts]).reshape(-1, 2),
                     coords=np.concatenate([p.coords for p in parts]).reshape(-1, 2),
                     offsets=offsets.astype(np.int64), **cat, **extra)
