import numpy as np
import pytest

from pronet_wsi.geometry import Box, Frame
from pronet_wsi.tiling import TileGrid, TilingConfig, balanced_core, select_tiles


@pytest.mark.parametrize("shape,tile,halo", [((1000, 700), 256, 64), ((257, 129), 128, 0), ((50, 60), 512, 128),
                                             ((16384, 5000), 2048, 96)])
def test_cores_partition_the_frame_and_reads_are_core_plus_halo(shape, tile, halo):
    grid = TileGrid(shape, TilingConfig(tile, halo))
    cover = np.zeros(shape, int)
    for t in grid:
        c = t.core
        cover[int(c.y0) : int(c.y1), int(c.x0) : int(c.x1)] += 1
        assert t.read.shape == grid.read_hw  # one model input shape per slide, never above the tile size
        assert max(grid.read_hw) <= tile
        assert t.read.x0 == c.x0 - halo and t.read.y0 == c.y0 - halo
    assert (cover == 1).all()
    assert len(list(grid)) == len(grid) == grid.grid_shape[0] * grid.grid_shape[1]
    # balanced: no more tiles along an axis than a fixed grid of full cores, and less than one core of waste
    for n, core, length in zip(grid.grid_shape, grid.core_hw, shape, strict=True):
        assert n == -(-length // (tile - 2 * halo)) and n * core - length < core


def test_balanced_core_wastes_little_beyond_the_frame():
    assert balanced_core(16384, 1856) == 1824  # 9 cores, 32 px past the edge (a fixed grid: 9 x 1856, 320 px)
    assert balanced_core(1000, 128) == 128
    assert balanced_core(50, 256) == 64  # one core, rounded up to the network's stride
    assert balanced_core(100, 100) == 100  # rounding up would exceed the largest core: exact


def test_a_stride_32_network_gets_cores_and_reads_on_its_pooling_grid():
    """A stride-2-stem model pools 5 times: cores in multiples of 32 and the default halo (96) keep every tile's
    read origin on the untiled image's 32 px grid (what makes tiled maps equal untiled ones)."""
    for stride in (16, 32):
        grid = TileGrid((16384, 5000), TilingConfig(2048, 96), stride)
        assert all(c % stride == 0 for c in grid.core_hw)
        assert all(t.read.x0 % stride == 0 and t.read.y0 % stride == 0 for t in grid)
    assert TileGrid((16384, 16384), TilingConfig(2048, 96), 32).core_hw == (1824, 1824)  # 1824 = 57 x 32
    assert TileGrid((5000, 5000), TilingConfig(2048, 96), 16).core_hw == (1680, 1680)
    assert TileGrid((5000, 5000), TilingConfig(2048, 96), 32).core_hw == (1696, 1696)


def test_neighbours_and_keys():
    grid = TileGrid((1000, 1000), TilingConfig(256, 64))  # 8 x 8 cores of 128
    assert grid.grid_shape == (8, 8)
    assert grid.neighbours((0, 0)) == [(0, 1), (1, 0), (1, 1)]
    assert len(grid.neighbours((3, 3))) == 8
    assert grid.tile(2, 3).key == "00002_00003"


def test_config_validation_names_the_fix():
    with pytest.raises(ValueError, match="core"):
        TilingConfig(256, 121)
    with pytest.raises(ValueError, match="halo_px"):
        TilingConfig(256, -1)
    with pytest.raises(ValueError, match="tile_px"):
        TilingConfig(8, 0)


def test_select_tiles_keeps_only_cores_with_tissue():
    frame = Frame.for_slide((1024, 1024), 0.5, 0.25)  # processing frame 2048 x 2048, scale 0.5
    grid = TileGrid(frame.shape, TilingConfig(1024, 0))  # 2 x 2 cores of 1024 proc px = 512 level-0 px
    mask = np.zeros((64, 64), bool)  # 16 level-0 px per mask px
    mask[40:50, 5:10] = True  # level-0 y 640-800, x 80-160: bottom-left core only
    sel = select_tiles(grid, frame, mask, 16.0)
    assert [t.index for t in sel] == [(1, 0)]
    assert len(select_tiles(grid, frame, None, 16.0)) == 4
    assert select_tiles(grid, frame, np.zeros((64, 64), bool), 16.0) == []
    assert frame.box_to_level0(sel[0].core) == Box(0, 512, 512, 1024)
