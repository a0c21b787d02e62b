"""Boxes and frames: the only place that converts between coordinate frames.

Two frames meet in whole-slide work:

* **level 0**: full-resolution slide pixels, ``(x, y)``, in the frame QuPath shows (OpenSlide bounds already
  subtracted, so ``(0, 0)`` is the top-left of the bounds rectangle). A pixel ``(col, row)`` covers
  ``[col, col + 1) x [row, row + 1)``.
* **processing**: the pixel grid the model sees, at the model's mpp; pixel ``(c, r)`` covers level-0
  ``[c * scale, (c + 1) * scale) x [r * scale, (r + 1) * scale)`` where ``scale = model_mpp / slide_mpp``
  (level-0 px per processing px).

Tiles, cores and halos are integer boxes in the processing frame; polygons and centroids leave the package in
level-0 ``(x, y)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pronet_wsi.errors import InputError


@dataclass(frozen=True)
class Box:
    """Axis-aligned half-open box ``[x0, x1) x [y0, y1)``; the frame is the caller's (see module docstring)."""

    x0: float
    y0: float
    x1: float
    y1: float

    def __post_init__(self) -> None:
        if self.x1 < self.x0 or self.y1 < self.y0:
            raise ValueError(f"Box({self.x0}, {self.y0}, {self.x1}, {self.y1}): x1 < x0 or y1 < y0")

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)`` as integers (for integer boxes)."""
        return int(round(self.height)), int(round(self.width))

    @property
    def area(self) -> float:
        return self.width * self.height

    @property
    def is_empty(self) -> bool:
        return self.width <= 0 or self.height <= 0

    def expand(self, px: float) -> Box:
        """The box grown by ``px`` on every side (shrunk when negative; never inverted)."""
        x0, x1 = self.x0 - px, self.x1 + px
        y0, y1 = self.y0 - px, self.y1 + px
        if x1 < x0:
            x0 = x1 = (self.x0 + self.x1) / 2
        if y1 < y0:
            y0 = y1 = (self.y0 + self.y1) / 2
        return Box(x0, y0, x1, y1)

    def intersect(self, other: Box) -> Box:
        """Overlap of two boxes (an empty box at ``self``'s corner when they do not overlap)."""
        x0, y0 = max(self.x0, other.x0), max(self.y0, other.y0)
        x1, y1 = min(self.x1, other.x1), min(self.y1, other.y1)
        if x1 <= x0 or y1 <= y0:
            return Box(self.x0, self.y0, self.x0, self.y0)
        return Box(x0, y0, x1, y1)

    def shift(self, dx: float, dy: float) -> Box:
        return Box(self.x0 + dx, self.y0 + dy, self.x1 + dx, self.y1 + dy)

    def scale(self, factor: float) -> Box:
        return Box(self.x0 * factor, self.y0 * factor, self.x1 * factor, self.y1 * factor)

    def contains_xy(self, xy: np.ndarray) -> np.ndarray:
        """(N,) bool: which of the (N, 2) ``(x, y)`` points lie inside the half-open box."""
        xy = np.asarray(xy, float).reshape(-1, 2)
        return (xy[:, 0] >= self.x0) & (xy[:, 0] < self.x1) & (xy[:, 1] >= self.y0) & (xy[:, 1] < self.y1)

    def edge_distance(self, xy: np.ndarray) -> np.ndarray:
        """(N,) float: distance from each ``(x, y)`` point to the nearest side of the box (negative outside)."""
        xy = np.asarray(xy, float).reshape(-1, 2)
        return np.min(
            np.stack([xy[:, 0] - self.x0, self.x1 - xy[:, 0], xy[:, 1] - self.y0, self.y1 - xy[:, 1]], axis=1),
            axis=1,
        )

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0, self.x1, self.y1)


@dataclass(frozen=True)
class Frame:
    """The processing frame of one slide: processing pixel ``(c, r)`` -> level-0 ``(c, r) * scale``.

    scale : level-0 px per processing px (``model_mpp / slide_mpp``).
    shape : ``(H, W)`` of the processing frame, enough to cover the level-0 region.
    level0_shape : ``(H, W)`` of the level-0 region (the bounds rectangle).
    """

    scale: float
    shape: tuple[int, int]
    level0_shape: tuple[int, int]

    @classmethod
    def for_slide(cls, level0_shape: tuple[int, int], slide_mpp: float, model_mpp: float) -> Frame:
        """Frame for a ``level0_shape`` ``(H, W)`` region read at ``model_mpp`` from a ``slide_mpp`` slide.

        A scale within 0.1 % of 1 is snapped to exactly 1 (no resampling).
        """
        if slide_mpp <= 0 or model_mpp <= 0:
            raise ValueError(f"mpp must be positive (slide {slide_mpp}, model {model_mpp})")
        scale = model_mpp / slide_mpp
        if abs(scale - 1.0) < 1e-3:
            scale = 1.0
        h, w = level0_shape
        return cls(scale, (max(1, math.ceil(h / scale - 1e-9)), max(1, math.ceil(w / scale - 1e-9))), (h, w))

    def to_level0(self, xy: np.ndarray) -> np.ndarray:
        """(N, 2) processing ``(x, y)`` -> (N, 2) level-0 ``(x, y)`` float64."""
        return np.asarray(xy, np.float64) * self.scale

    def from_level0(self, xy: np.ndarray) -> np.ndarray:
        """(N, 2) level-0 ``(x, y)`` -> (N, 2) processing ``(x, y)`` float64."""
        return np.asarray(xy, np.float64) / self.scale

    def box_to_level0(self, box: Box) -> Box:
        return box.scale(self.scale)


def rc_to_xy(rc: np.ndarray, origin_xy: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """(N, 2) array-frame ``(row, col)`` pixel-centre positions -> (N, 2) ``(x, y)`` in the frame of ``origin``.

    The array pixel ``[r, c]`` covers ``[c, c + 1) x [r, r + 1)``, so its centre is ``(c + 0.5, r + 0.5)``.
    """
    rc = np.asarray(rc, np.float64).reshape(-1, 2)
    return np.stack([rc[:, 1] + 0.5 + origin_xy[0], rc[:, 0] + 0.5 + origin_xy[1]], axis=1)


def xy_to_index(xy: np.ndarray) -> np.ndarray:
    """(N, 2) continuous ``(x, y)`` (QuPath's frame: pixel ``[r, c]`` centred at ``(c + 0.5, r + 0.5)``) ->
    (N, 2) ``(x, y)`` in the array-index frame, where pixel ``[r, c]`` is centred at ``(c, r)``.

    The inverse of :func:`rc_to_xy` up to the (row, col) order; training converts its points with it once.
    """
    return np.asarray(xy, np.float64).reshape(-1, 2) - 0.5


def best_level(downsamples: list[float] | tuple[float, ...], target_downsample: float) -> int:
    """Index of the coarsest pyramid level that is still at least as fine as ``target_downsample``.

    A level counts as fine enough when its downsample is at most 1 % above the target (so a 2.0005
    level serves a target of 2.0).
    """
    best = 0
    for i, ds in enumerate(downsamples):
        if ds <= target_downsample * 1.01 and ds >= downsamples[best]:
            best = i
    return best


def check_scale(mpp: float, model_mpp: float, source: str) -> None:
    """An error for a pixel size more than 4x coarser or 8x finer than the model's.

    Coarser means upsampling (a 300-dpi TIFF read as 84 um/px would be enlarged 339x: hours of work on
    nothing); much finer is almost always a wrong value too.
    """
    if not model_mpp / 8 <= mpp <= model_mpp * 4:
        raise InputError(f"{source}: {mpp:g} um/px is too far from the model's {model_mpp:g} um/px (more than 4x "
                         "coarser or 8x finer); give the true pixel size with --mpp (40x is ~0.25, 20x ~0.5)")


def as_points_xy(points: np.ndarray, name: str = "points_xy") -> np.ndarray:
    """``points`` as an (N, 2) float64 array of (x, y); a ValueError naming ``name`` for another shape or a NaN /
    infinite coordinate (a caller's bug, not the user's file: readers check files first)."""
    pts = np.asarray(points, np.float64)
    if pts.size == 0:
        return pts.reshape(0, 2)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"{name} has shape {pts.shape}; expected (N, 2) (x, y)")
    if not np.isfinite(pts).all():
        raise ValueError(f"{name} holds NaN or infinite coordinates")
    return pts
