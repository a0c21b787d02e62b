"""The tile grid: core boxes that partition the processing frame, plus a halo around each core.

Pure geometry. A tile is at most ``tile_px`` square (the model input); its core is the central part without
``halo_px`` on each side. Cores partition the processing frame (see :mod:`pronet_wsi.geometry`), so every nucleus
centre lies in exactly one core; the halo gives the model context and holds the rest of the nuclei whose centres
sit near the core's edge.

The grid is balanced: along each axis it uses as few cores as ``tile_px`` allows, all of one size (rounded up to
a multiple of the network's stride, 16 or 32), so the model never computes a mostly-empty strip beyond the frame's
edge. A 16384 px side at tile 2048 / halo 96 gets 9 cores of 1824 px (32 px past the edge) instead of 9 of 1856.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pronet_wsi.errors import InputError
from pronet_wsi.geometry import Box, Frame
from pronet_wsi.tissue import mask_fraction


@dataclass(frozen=True)
class TilingConfig:
    """tile_px : largest model input side in processing px; halo_px : context on each side (core <= tile - 2 halo).

    The default tile is 1792 px: with two OpenVINO forwards at once (``segment`` on a CPU) it ran 10-15 % faster
    than one forward on 2048 px tiles at the same peak memory (two 2048 px forwards: +0.7 GB; benchmarks/RESULTS.md).
    Larger tiles waste less on the halo at more memory: with the shipped model's INT8 graph the 1 Gpx benchmark
    slide took 4.9 / 4.4 / 4.2 s/mm² at tiles of 1792 / 2304 / 2560 px, peak RSS 1.7 / 2.4 / 2.8 GB; the float
    graph in fp32 needs ~0.6 GB more at 1792 and ~1 GB more at 2304, which would pass 3 GB.
    The halo is the model's ``context_px`` in ``segment`` (v3: 96, its maps identical beyond it; v4: 160). At 2048 /
    96 the model computes 1.22x the core's pixels (a 16384 px side: reads of 2016 px for cores of 1824); 1024 / 128
    computed 1.80x:

    >>> for config in (TilingConfig(2048, 96), TilingConfig(1024, 128)):
    ...     grid = TileGrid((16384, 16384), config)
    ...     print(grid.grid_shape, grid.core_hw, grid.read_hw, round((grid.read_hw[0] / grid.core_hw[0]) ** 2, 2))
    (9, 9) (1824, 1824) (2016, 2016) 1.22
    (22, 22) (752, 752) (1008, 1008) 1.8
    """

    tile_px: int = 1792
    halo_px: int = 96

    def __post_init__(self) -> None:
        if not 32 <= self.tile_px <= 16384:
            raise InputError(f"tile_px={self.tile_px}: must be between 32 and 16384")
        if self.halo_px < 0:
            raise InputError(f"halo_px={self.halo_px}: must be >= 0")
        if self.core_px < 16:
            raise InputError(f"tile_px={self.tile_px}, halo_px={self.halo_px}: the core (tile - 2 * halo = "
                             f"{self.core_px}) must be >= 16 px; use a larger --tile-px or a smaller --halo-px")

    @property
    def core_px(self) -> int:
        return self.tile_px - 2 * self.halo_px


@dataclass(frozen=True)
class Tile:
    """One tile. ``index`` (row, col) in the grid; ``core`` and ``read`` integer boxes in the processing frame."""

    index: tuple[int, int]
    core: Box
    read: Box

    @property
    def key(self) -> str:
        return f"{self.index[0]:05d}_{self.index[1]:05d}"


def balanced_core(length: int, max_core: int, multiple: int = 16) -> int:
    """Core side along an axis of ``length`` px: the fewest cores of at most ``max_core``, all of one size,
    rounded up to ``multiple`` when that stays within ``max_core``."""
    n = max(1, -(-length // max_core))
    even = -(-length // n)
    rounded = -(-even // multiple) * multiple
    return rounded if rounded <= max_core else even


@dataclass(frozen=True)
class TileGrid:
    """All tiles over a processing frame of ``shape`` ``(H, W)``; every tile reads ``read_hw`` px.

    stride : the network's (``PRONet.stride``, 16 or 32); cores are rounded to a multiple of it so that every
    tile's pooling grid is the untiled image's (with a halo that is a multiple of it too, as the default 96 is).
    """

    shape: tuple[int, int]
    config: TilingConfig
    stride: int = 16

    @property
    def core_hw(self) -> tuple[int, int]:
        """Core (height, width) in processing px (the last row / column is cut at the frame's edge)."""
        return tuple(balanced_core(max(1, n), self.config.core_px, self.stride)  # type: ignore[return-value]
                     for n in self.shape)

    @property
    def read_hw(self) -> tuple[int, int]:
        """Model input (height, width) of every tile: the core plus the halo on both sides."""
        ch, cw = self.core_hw
        return ch + 2 * self.config.halo_px, cw + 2 * self.config.halo_px

    @property
    def grid_shape(self) -> tuple[int, int]:
        ch, cw = self.core_hw
        return -(-self.shape[0] // ch), -(-self.shape[1] // cw)

    def tile(self, row: int, col: int) -> Tile:
        (ch, cw), h = self.core_hw, self.config.halo_px
        H, W = self.shape
        core = Box(col * cw, row * ch, min((col + 1) * cw, W), min((row + 1) * ch, H))
        rh, rw = self.read_hw
        read = Box(col * cw - h, row * ch - h, col * cw - h + rw, row * ch - h + rh)
        return Tile((row, col), core, read)

    def __iter__(self) -> Iterator[Tile]:
        rows, cols = self.grid_shape
        for r in range(rows):
            for c in range(cols):
                yield self.tile(r, c)

    def __len__(self) -> int:
        rows, cols = self.grid_shape
        return rows * cols

    def neighbours(self, index: tuple[int, int]) -> list[tuple[int, int]]:
        """Indices of the up to 8 tiles around ``index`` (row-major order)."""
        rows, cols = self.grid_shape
        r, c = index
        return [(r + dr, c + dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)
                if (dr or dc) and 0 <= r + dr < rows and 0 <= c + dc < cols]


def select_tiles(grid: TileGrid, frame: Frame, mask: np.ndarray | None, mask_downsample: float) -> list[Tile]:
    """Tiles (row-major) whose core holds any tissue; all tiles when ``mask`` is None.

    Parameters
    ----------
    mask : (h, w) bool tissue mask; one mask px covers ``mask_downsample`` level-0 px.
    """
    if mask is None:
        return list(grid)
    out = []
    for t in grid:
        if mask_fraction(mask, frame.box_to_level0(t.core).as_tuple(), mask_downsample) > 0:
            out.append(t)
    return out
