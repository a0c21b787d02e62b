"""Tiles at the tissue's edge read and compute only the tissue's bounding box, not the glass around it.

Pure geometry on a tile's ``read`` box (its ``core`` and so the ownership of nuclei stay as they are). The crop is
the tissue mask's bounding box inside the read box, widened by a margin (the model's context, so maps on tissue
are the uncropped tile's: seam-exact) and snapped outward to the network's stride *from the read box's corner*, so
the crop's pooling grid is the full tile's. What is cut away is glass at least the margin away from any tissue.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from pronet_wsi.geometry import Box, Frame
from pronet_wsi.tiling import Tile


def tissue_bbox(read: Box, frame: Frame, mask: np.ndarray, mask_downsample: float) -> Box | None:
    """Bounding box (processing frame) of the tissue-mask pixels that touch ``read``, or None without any.

    Parameters
    ----------
    read : a tile's read box, processing frame. mask : (h, w) bool, one px = ``mask_downsample`` level-0 px.
    """
    x0, y0, x1, y1 = frame.box_to_level0(read).as_tuple()
    h, w = mask.shape
    c0, r0 = max(0, math.floor(x0 / mask_downsample)), max(0, math.floor(y0 / mask_downsample))
    c1, r1 = min(w, math.ceil(x1 / mask_downsample)), min(h, math.ceil(y1 / mask_downsample))
    if c1 <= c0 or r1 <= r0:
        return None
    sub = mask[r0:r1, c0:c1]
    rows, cols = np.flatnonzero(sub.any(axis=1)), np.flatnonzero(sub.any(axis=0))
    if not len(rows):
        return None
    k = mask_downsample / frame.scale  # processing px per mask px
    return Box((c0 + cols[0]) * k, (r0 + rows[0]) * k, (c0 + cols[-1] + 1) * k, (r0 + rows[-1] + 1) * k)


def crop_read(tile: Tile, tissue: Box, margin_px: int, stride: int = 16) -> Tile:
    """``tile`` with its read box cut to ``tissue`` widened by ``margin_px``, snapped outward to ``stride`` from
    the read box's top-left corner and kept inside the read box; the core is unchanged."""
    read = tile.read
    want = tissue.expand(margin_px)

    def lo(v: float, origin: float) -> int:
        return int(origin + max(0, math.floor((v - origin) / stride) * stride))

    def hi(v: float, origin: float, end: float) -> int:
        return int(min(end, origin + math.ceil((v - origin) / stride) * stride))

    x0, y0 = lo(want.x0, read.x0), lo(want.y0, read.y0)
    x1, y1 = hi(want.x1, read.x0, read.x1), hi(want.y1, read.y0, read.y1)
    if x1 <= x0 or y1 <= y0:
        return tile
    return replace(tile, read=Box(x0, y0, x1, y1))


def crop_to_tissue(tiles: list[Tile], frame: Frame, mask: np.ndarray, mask_downsample: float,
                   margin_px: int, stride: int = 16) -> list[Tile]:
    """Each tile's read box cut to its tissue (see :func:`crop_read`); tiles without tissue stay whole."""
    out = []
    for t in tiles:
        box = tissue_bbox(t.read, frame, mask, mask_downsample)
        out.append(t if box is None else crop_read(t, box, margin_px, stride))
    return out
