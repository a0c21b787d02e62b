"""EM point refinement, the E-step (paper Eq. 5): move each point to where its Voronoi cell's
foreground pixels vote, (row, col) + O(row, col)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pronet_wsi.errors import InputError


@dataclass(frozen=True)
class RefineConfig:
    """delta_px : accept a candidate only if it is closer than this to the current point (paper: 8).
    sigma_px : Gaussian smoothing of the vote map before taking the peak.
    min_votes : cells with fewer foreground votes keep their point.
    """

    delta_px: float = 8.0
    sigma_px: float = 1.0
    min_votes: int = 5

    def __post_init__(self) -> None:
        if self.delta_px <= 0:
            raise InputError(f"delta_px={self.delta_px}: must be > 0")
        if self.sigma_px < 0:
            raise InputError(f"sigma_px={self.sigma_px}: must be >= 0")


def refine_points(points_xy: np.ndarray, cells: np.ndarray, foreground: np.ndarray, offsets: np.ndarray,
                  config: RefineConfig = RefineConfig()) -> tuple[np.ndarray, np.ndarray]:
    """One E-step.

    Parameters
    ----------
    points_xy : (N, 2) float, current points (x, y) in the image frame.
    cells : (H, W) int, Voronoi cell of each pixel as an index into ``points_xy`` (-1 = none).
    foreground : (H, W) bool, predicted binary mask.
    offsets : (2, H, W) float, predicted (dy, dx) px from each pixel to its nucleus centre.

    Returns
    -------
    new_points_xy : (N, 2) float64, refined points (unchanged where no candidate was accepted).
    movement : (N,) float64, distance each point moved (0 where unchanged).
    """
    points_xy = np.asarray(points_xy, np.float64).reshape(-1, 2)
    new = points_xy.copy()
    movement = np.zeros(len(points_xy))
    h, w = foreground.shape
    rows, cols = np.nonzero(foreground & (cells >= 0))
    if rows.size == 0 or len(points_xy) == 0:
        return new, movement
    cell = cells[rows, cols].astype(np.int64)
    vr = rows + offsets[0, rows, cols].astype(np.float64)
    vc = cols + offsets[1, rows, cols].astype(np.float64)
    inside = (vr > -0.5) & (vr < h - 0.5) & (vc > -0.5) & (vc < w - 0.5)
    cell, vr, vc = cell[inside], vr[inside], vc[inside]
    ir, ic = np.rint(vr).astype(np.int64), np.rint(vc).astype(np.int64)
    # vote density per cell (a cell's own votes only), lightly smoothed with a 3x3 Gaussian stencil
    key = cell * (h * w) + ir * w + ic
    ukey, counts = np.unique(key, return_counts=True)
    score = np.zeros(ukey.size)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            weight = np.exp(-(dr * dr + dc * dc) / (2 * config.sigma_px**2)) if config.sigma_px > 0 else float(
                dr == dc == 0)
            nb = ukey + dr * w + dc
            pos = np.clip(np.searchsorted(ukey, nb), 0, ukey.size - 1)
            score += weight * np.where(ukey[pos] == nb, counts[pos], 0)
    score = score[np.searchsorted(ukey, key)]
    n_votes = np.bincount(cell, minlength=len(points_xy))
    # the best-scored vote of each cell is its peak
    order = np.lexsort((-score, cell))
    first = np.ones(order.size, bool)
    first[1:] = cell[order][1:] != cell[order][:-1]
    peak_idx = order[first]
    peak_cell = cell[peak_idx]
    peak_r, peak_c = vr[peak_idx], vc[peak_idx]
    # sub-pixel candidate: mean of the cell's votes within 2 px of its peak
    near = np.hypot(vr - _scatter(peak_r, peak_cell, cell), vc - _scatter(peak_c, peak_cell, cell)) <= 2.0
    cnt = np.bincount(cell[near], minlength=len(points_xy)).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        cand_r = np.bincount(cell[near], vr[near], minlength=len(points_xy)) / cnt
        cand_c = np.bincount(cell[near], vc[near], minlength=len(points_xy)) / cnt
    cand_xy = np.stack([cand_c, cand_r], axis=1)
    dist = np.hypot(*(cand_xy - points_xy).T)
    accept = (n_votes >= config.min_votes) & (cnt > 0) & (dist < config.delta_px)
    new[accept] = cand_xy[accept]
    movement[accept] = dist[accept]
    return new, movement


def _scatter(values: np.ndarray, at_cells: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Broadcast a per-cell value (given for the cells ``at_cells``) to every vote of ``cells``."""
    table = np.full(int(cells.max()) + 1, np.nan)
    table[at_cells] = values
    return table[cells]
