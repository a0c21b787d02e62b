"""Cost of QuPath measurements and cells per nucleus: ``tile_instances`` + GeoJSON text with each setting.

    python -m benchmarks.bench_measurements              # MoNuSeg images + their labels (if present), else synthetic

On real H&E tiles (MoNuSeg 1000x1000 test images, 0.25 um/px, with their ground-truth nuclei as the labels, so the
density is real) it times one tile's candidates -> polygons -> measurements -> GeoJSON feature text, one thread,
for ``--measurements none | basic | all`` and ``all`` with ``--cells 5``, and prints ms per tile and us per nucleus
(median of 3 runs per image, summed over the images).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from benchmarks.record import banner
from pronet_wsi.export import feature_bodies
from pronet_wsi.geometry import Box, Frame
from pronet_wsi.instances import tile_instances
from pronet_wsi.measurements import MeasureConfig
from pronet_wsi.postprocess import Segmentation
from pronet_wsi.synthetic import synthetic_nuclei

MONUSEG = Path(__file__).resolve().parents[2] / "shared" / "data" / "monuseg"
SETTINGS = {"none": MeasureConfig("none"), "basic": MeasureConfig("basic"), "all": MeasureConfig("all"),
            "all + cells 5 um": MeasureConfig("all", 5.0)}


def tiles() -> list[tuple[np.ndarray, np.ndarray]]:
    """(rgb, labels) pairs: MoNuSeg test images and labels, or synthetic nuclei when the data is absent."""
    from PIL import Image

    from pronet_wsi.images import read_image

    names = ["TCGA-E2-A1B5-01Z-00-DX1", "TCGA-B0-5698-01Z-00-DX1", "TCGA-21-5784-01Z-00-DX1",
             "TCGA-CH-5767-01Z-00-DX1"]
    if (MONUSEG / "labels").is_dir():
        out = []
        for n in names:
            rgb = read_image(MONUSEG / "images" / f"{n}.tif")
            lab = np.asarray(Image.open(MONUSEG / "labels" / f"{n}.png"))
            out.append((rgb, lab if lab.ndim == 2 else lab[..., 0]))
        return out
    img, lab, _ = synthetic_nuclei((1000, 1000), n_nuclei=600, seed=0)
    return [(img, lab)]


def segmentation(labels: np.ndarray) -> Segmentation:
    from scipy import ndimage as ndi

    _, inv = np.unique(labels, return_inverse=True)
    lab = inv.reshape(labels.shape).astype(np.uint32)  # 0 stays 0 (the smallest id), the rest 1..N
    n = int(lab.max())
    centers = np.array(ndi.center_of_mass(np.ones_like(lab), lab, np.arange(1, n + 1))).reshape(-1, 2)
    return Segmentation(lab, centers, np.ones(n, np.float32))


def smoke_tiles() -> list[tuple[np.ndarray, np.ndarray]]:
    rgb, labels, _ = synthetic_nuclei((192, 192), n_nuclei=20, seed=0)
    return [(rgb, labels)]


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="one small synthetic tile (does it run?)")
    args = parser.parse_args()
    print(banner(seed=0))
    data = [(rgb, segmentation(lab)) for rgb, lab in (smoke_tiles() if args.smoke else tiles())]
    print(f"{len(data)} tiles of {data[0][1].labels.shape[0]}x{data[0][1].labels.shape[1]} px, "
          f"{sum(s.n for _, s in data)} nuclei")
    print("| setting | ms / tile | us / nucleus | extra over none, us / nucleus |")
    print("|---|---|---|---|")
    base = None
    for name, cfg in SETTINGS.items():
        total, nuclei = 0.0, 0
        for rgb, seg in data:
            h, w = seg.labels.shape
            box = Box(0, 0, w, h)
            runs = []
            for _ in range(3):
                t = time.perf_counter()
                inst = tile_instances(seg, (seg.labels > 0).astype(np.float32), box, box, Frame(1.0, (h, w), (h, w)),
                                      0.25, 8.0, image=rgb, measure=cfg)
                feature_bodies(inst)
                runs.append(time.perf_counter() - t)
            total += float(np.median(runs))
            nuclei += len(inst)
        per = total / nuclei * 1e6
        base = per if base is None else base
        print(f"| {name} | {total / len(data) * 1e3:.0f} | {per:.0f} | {per - base:.0f} |")


if __name__ == "__main__":
    main()
