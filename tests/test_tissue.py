import numpy as np
import pytest

from pronet_wsi.tissue import (
    MASK_UM_PER_PX,
    TissueConfig,
    block_mean,
    mask_fraction,
    otsu_threshold,
    saturation,
    tissue_mask,
)


def blob_thumbnail(h=200, w=300):
    rng = np.random.default_rng(0)
    img = np.full((h, w, 3), 243, np.uint8) + rng.integers(0, 4, (h, w, 3)).astype(np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    inside = (yy - 100) ** 2 / 60**2 + (xx - 150) ** 2 / 90**2 <= 1
    img[inside] = (220, 150, 200)
    img[inside & (rng.random((h, w)) < 0.1)] = (90, 50, 140)
    return img, inside


def test_mask_finds_the_tissue_blob_and_skips_glass():
    img, inside = blob_thumbnail()
    mask = tissue_mask(img, um_per_px=8.0, config=TissueConfig(dilate_um=0))
    assert mask[inside].mean() > 0.99
    assert mask[~inside].mean() < 0.02
    grown = tissue_mask(img, um_per_px=8.0, config=TissueConfig(dilate_um=80))
    assert grown.sum() > mask.sum() and (grown | ~mask).all()


def test_a_fine_thumbnail_is_masked_at_the_coarse_pixel_size():
    """A thumbnail finer than MASK_UM_PER_PX (a small slide's) gives the mask of its block means, scaled back to
    its own shape: the blob found, the glass not, sizes that are not a multiple of the block kept."""
    img, inside = blob_thumbnail(203, 301)
    um = MASK_UM_PER_PX / 4  # blocks of 4 x 4 px
    mask = tissue_mask(img, um, TissueConfig(dilate_um=0, min_region_um2=100))
    assert mask.shape == inside.shape
    assert mask[inside].mean() > 0.97 and mask[~inside].mean() < 0.03
    coarse = tissue_mask(block_mean(img, 4), MASK_UM_PER_PX, TissueConfig(dilate_um=0, min_region_um2=100))
    assert np.array_equal(mask, np.repeat(np.repeat(coarse, 4, 0), 4, 1)[:203, :301])


def test_block_mean_averages_blocks_and_repeats_the_edge():
    img = np.arange(2 * 5 * 3, dtype=np.uint8).reshape(2, 5, 3)
    out = block_mean(img, 2)
    assert out.shape == (1, 3, 3)
    assert out[0, 0].tolist() == np.rint(img[:, :2].reshape(-1, 3).mean(0)).tolist()
    assert out[0, 2].tolist() == np.rint(img[:, 4].reshape(-1, 3).mean(0)).tolist()  # the edge column repeated


def test_white_and_grey_slides_have_no_tissue():
    assert not tissue_mask(np.full((100, 120, 3), 255, np.uint8), 8.0).any()
    grey = np.full((100, 120, 3), 230, np.uint8)
    grey[40:60, 40:60] = 200  # grey dust is not stained tissue
    assert not tissue_mask(grey, 8.0).any()


def test_all_tissue_slide_is_all_tissue():
    rng = np.random.default_rng(1)
    img = np.zeros((80, 80, 3), np.uint8)
    img[:] = (220, 150, 200)
    img[rng.random((80, 80)) < 0.3] = (90, 50, 140)
    assert tissue_mask(img, 8.0).mean() > 0.99


def test_saturation_and_otsu():
    assert saturation(np.array([[[255, 255, 255], [255, 0, 0], [0, 0, 0]]], np.uint8)).tolist() == [[0, 1, 0]]
    values = np.concatenate([np.full(100, 0.1), np.full(100, 0.7)])
    assert 0.1 < otsu_threshold(values) <= 0.7
    assert otsu_threshold(np.full(10, 0.3)) == pytest.approx(0.3)


def test_mask_fraction_counts_partly_covered_pixels():
    mask = np.zeros((10, 10), bool)
    mask[2, 3] = True
    assert mask_fraction(mask, (30, 20, 40, 30), 10.0) == 1.0
    assert mask_fraction(mask, (35, 25, 36, 26), 10.0) == 1.0
    assert mask_fraction(mask, (0, 0, 20, 20), 10.0) == 0.0
    assert mask_fraction(mask, (500, 500, 600, 600), 10.0) == 0.0
