"""The tile grid: core boxes that partition the processing frame, plus a halo around each core.

Pure geometry. A tile is ``tile_px`` square (the model input); its core is the central
``tile_px - 2 * halo_px`` square. Cores partition the processing frame (see :mod:`pronet_wsi.geometry`), so
every nucleus centre lies in exactly one core; the halo gives the model context and holds the rest of the
nuclei whose centres sit near the core's edge.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pronet_wsi.geometry import Box, Frame
from pronet_wsi.tissue import mask_fraction


@dataclass(frozen=True)
class TilingConfig:
    """tile_px : model input side in processing px; halo_px : context on each side (core = tile - 2 halo)."""

    tile_px: int = 1024
    halo_px: int = 128

    def __post_init__(self) -> None:
        if not 32 <= self.tile_px <= 16384:
            raise ValueError(f"tile_px={self.tile_px}: must be between 32 and 16384")
        if self.halo_px < 0:
            raise ValueError(f"halo_px={self.halo_px}: must be >= 0")
        if self.core_px < 16:
            raise ValueError(f"tile_px={self.tile_px}, halo_px={self.halo_px}: the core (tile - 2 * halo = "
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


@dataclass(frozen=True)
class TileGrid:
    """All tiles over a processing frame of ``shape`` ``(H, W)``."""

    shape: tuple[int, int]
    config: TilingConfig

    @property
    def grid_shape(self) -> tuple[int, int]:
        c = self.config.core_px
        return -(-self.shape[0] // c), -(-self.shape[1] // c)

    def tile(self, row: int, col: int) -> Tile:
        c, h = self.config.core_px, self.config.halo_px
        H, W = self.shape
        core = Box(col * c, row * c, min((col + 1) * c, W), min((row + 1) * c, H))
        read = Box(col * c - h, row * c - h, col * c - h + self.config.tile_px, row * c - h + self.config.tile_px)
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
