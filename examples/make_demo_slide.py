"""Write a small demo whole-slide image: a pyramidal tiled TIFF that OpenSlide and tiffslide both read.

    python examples/make_demo_slide.py                      # -> examples/demo_slide.tif (2048 x 2048, 0.25 um/px)
    pronet-wsi segment examples/demo_slide.tif -o demo_out  # -> demo_out/demo_slide.geojson for QuPath

The content is synthetic H&E-like tissue (purple elliptical nuclei of varying density and stain on textured
pink stroma) inside an irregular tissue outline on white glass, so the tissue mask has glass to skip. The
levels are successive TIFF pages (2048, 1024, 512 px), JPEG-compressed, with the pixel size stored in the
resolution tags.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from pronet_wsi.slide import open_slide, write_pyramid_tiff

GLASS = np.array([244, 242, 245], float)


def tissue_outline(size: int, seed: int) -> np.ndarray:
    """(size, size) bool: a smooth random blob covering roughly the middle 60 % of the image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    angle = np.arctan2(yy, xx)
    radius = 0.36 + sum(rng.uniform(0.01, 0.04) * np.cos(k * angle + rng.uniform(0, 2 * np.pi)) for k in range(2, 7))
    return np.hypot(yy, xx) < radius


def demo_image(size: int = 2048, seed: int = 0, nuclei_per_mpx: float = 900.0, glass: bool = True,
               centers_out: list | None = None) -> np.ndarray:
    """(size, size, 3) uint8 synthetic H&E-like content: nuclei on textured stroma inside tissue, glass outside
    (``glass=False``: tissue everywhere, for tiling into large benchmark slides). ``centers_out``, when given,
    receives each drawn nucleus's centre as QuPath level-0 (x, y) (the true clicks, for the adaptation example).

    Nuclei are ellipses (radius 5-10 px, i.e. 2.5-5 um at 0.25 um/px) drawn one at a time in their own
    window, with a density that varies smoothly across the tissue and a per-nucleus stain intensity.
    """
    rng = np.random.default_rng(seed)
    outline = tissue_outline(size, seed) if glass else np.ones((size, size), bool)
    density = ndi.gaussian_filter(rng.random((size // 64, size // 64)), 2.0)
    density = ndi.zoom((density - density.min()) / (np.ptp(density) + 1e-9), size / density.shape[0], order=1)
    stroma = np.array([236, 178, 212], float) + ndi.gaussian_filter(rng.normal(0, 1, (size, size)), 4)[..., None] * \
        np.array([40, 60, 40]) + rng.normal(0, 4, (size, size, 3))
    ink = np.zeros((size, size), float)  # hematoxylin amount per pixel
    n_try = int(nuclei_per_mpx * size * size / 1e6 * 1.6)
    centers = rng.uniform(12, size - 12, (n_try, 2))
    occupied = np.zeros((size, size), bool)
    yy, xx = np.mgrid[-12:13, -12:13]
    for (r0, c0) in centers:
        r, c = int(r0), int(c0)
        if not outline[r, c] or rng.random() > 0.25 + 0.75 * density[r, c]:
            continue
        ra, rb, th = rng.uniform(5, 10), rng.uniform(5, 10), rng.uniform(0, np.pi)
        u = yy * np.cos(th) + xx * np.sin(th)
        v = -yy * np.sin(th) + xx * np.cos(th)
        disk = (u / ra) ** 2 + (v / rb) ** 2 <= 1.0
        window = occupied[r - 12 : r + 13, c - 12 : c + 13]
        if (disk & window).sum() > 0.1 * disk.sum():
            continue
        window |= disk
        if centers_out is not None:
            centers_out.append((c + 0.5, r + 0.5))
        ink[r - 12 : r + 13, c - 12 : c + 13] += disk * rng.uniform(0.75, 1.0)
    ink = np.clip(ndi.gaussian_filter(ink, 0.8), 0, 1)[..., None]
    nucleus = np.array([88, 52, 140], float) + rng.normal(0, 10, (size, size, 3))
    tissue = stroma * (1 - ink) + nucleus * ink
    if not glass:
        return np.clip(tissue, 0, 255).astype(np.uint8)
    inside = ndi.gaussian_filter(outline.astype(float), 3.0)[..., None]
    background = GLASS + rng.normal(0, 1.5, (size, size, 3))
    return np.clip(tissue * inside + background * (1 - inside), 0, 255).astype(np.uint8)


def make_demo_slide(path: str | Path, size: int = 2048, mpp: float = 0.25, seed: int = 0,
                    truth: str | Path | None = None) -> Path:
    """Write the demo slide to ``path`` and check that both backends read it back; ``truth``: also write every
    nucleus centre there as QuPath points (.geojson) or an x,y CSV."""
    path = Path(path)
    centers: list = []
    write_pyramid_tiff(path, demo_image(size, seed=seed, centers_out=centers), mpp, tile_px=256, levels=3,
                       compression="jpeg", quality=85)
    if truth is not None:
        from pronet_wsi.training.points import write_points

        write_points(truth, np.array(centers, float).reshape(-1, 2))
    for backend in ("openslide", "tiffslide"):
        with open_slide(path, backend) as slide:
            assert slide.level_count == 3 and abs(slide.mpp - mpp) < 1e-6, (backend, slide.info())
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", default=str(Path(__file__).with_name("demo_slide.tif")))
    parser.add_argument("--size", type=int, default=2048, help="side in px (a multiple of 256)")
    parser.add_argument("--mpp", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--truth", default=None, help="also write the true nucleus centres here (.geojson/.csv)")
    args = parser.parse_args()
    path = make_demo_slide(args.path, args.size, args.mpp, args.seed, args.truth)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB, {args.size} x {args.size} px at {args.mpp} um/px, "
          f"3 levels; readable by OpenSlide and tiffslide)")


if __name__ == "__main__":
    main()
