"""Classical reference pipeline for the results table, scored on the 14 MoNuSeg test images.

Hematoxylin channel by colour deconvolution (skimage.color.rgb2hed), Gaussian smoothing, Otsu threshold,
small-object and small-hole removal, then a distance-transform watershed seeded at the distance peaks.
No training, no points. Parameters were chosen once on a few MoNuSeg *training* images, never on the test set.

    python -m benchmarks.classical [--results benchmarks/results/monuseg.csv] [--no-record]

Prints a per-image and mean table and records one row ``config = classical`` in the results CSV (an existing
``classical`` row is replaced, other rows are kept; the file is created with the standard header if absent).
Exits with a message when ../shared/data is absent.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from skimage.color import rgb2hed
from skimage.feature import peak_local_max
from skimage.filters import gaussian, threshold_otsu
from skimage.morphology import remove_small_holes, remove_small_objects
from skimage.segmentation import watershed

from benchmarks.record import RUN_COLUMNS, banner, run_info, smoke_skip
from pronet_wsi.files import atomic_write
from pronet_wsi.images import read_image, read_labels
from pronet_wsi.metrics import ImageScores, evaluate_image, mean_scores

REPO = Path(__file__).resolve().parents[1]
MONUSEG = REPO.parent / "shared" / "data" / "monuseg"
SPLIT_CSV = MONUSEG / "splits" / "monuseg_kumar_split.csv"
RESULTS_CSV = REPO / "benchmarks" / "results" / "monuseg.csv"
RESULTS_HEADER = ("config", "shift", "seed", "train_minutes", "epochs", "object_dice", "aji", "pixel_dice", "pq")


@dataclass(frozen=True)
class ClassicalConfig:
    """Knobs of the classical pipeline, in pixels of the MoNuSeg images (about 0.25 um/px)."""

    smooth_sigma_px: float = 1.0  # Gaussian on the hematoxylin channel before Otsu
    min_object_px: int = 30  # foreground components this small or smaller are removed
    max_hole_px: int = 64  # holes this small or smaller are filled
    distance_sigma_px: float = 1.0  # Gaussian on the distance transform before peak finding
    min_peak_distance_px: int = 7  # minimum distance between two watershed markers

    def __post_init__(self) -> None:
        for name in ("smooth_sigma_px", "distance_sigma_px"):
            if not 0.0 <= getattr(self, name) <= 10.0:
                raise ValueError(f"{name} must be in [0, 10] px, got {getattr(self, name)}")
        for name in ("min_object_px", "max_hole_px", "min_peak_distance_px"):
            if not 1 <= getattr(self, name) <= 10_000:
                raise ValueError(f"{name} must be in [1, 10000] px, got {getattr(self, name)}")


def segment_classical(rgb: np.ndarray, config: ClassicalConfig) -> np.ndarray:
    """Segment nuclei in an (H, W, 3) uint8 H&E image -> (H, W) int32 instance map, 0 = background."""
    hematoxylin = rgb2hed(rgb)[..., 0]
    if config.smooth_sigma_px > 0:
        hematoxylin = gaussian(hematoxylin, config.smooth_sigma_px)
    mask = hematoxylin > threshold_otsu(hematoxylin)
    mask = remove_small_objects(mask, max_size=config.min_object_px)
    mask = remove_small_holes(mask, max_size=config.max_hole_px)
    distance = ndi.distance_transform_edt(mask)
    if config.distance_sigma_px > 0:
        distance = gaussian(distance, config.distance_sigma_px)
    components, _ = ndi.label(mask)
    peaks_rc = peak_local_max(distance, min_distance=config.min_peak_distance_px, labels=components,
                              exclude_border=False)
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks_rc.T)] = np.arange(1, len(peaks_rc) + 1)
    return watershed(-distance, markers, mask=mask).astype(np.int32)


def monuseg_test_rows() -> list[dict[str, str]]:
    with open(SPLIT_CSV, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["paper_split"] == "test"]
    if len(rows) != 14:
        raise SystemExit(f"{SPLIT_CSV}: expected 14 test images (paper_split == test), found {len(rows)}")
    return rows


def record(path: Path, mean: ImageScores) -> None:
    """Replace or append the ``classical`` row of the results CSV, keeping every other row and its header."""
    header, rows = list(RESULTS_HEADER), []
    if path.exists():
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            header = list(reader.fieldnames or RESULTS_HEADER)
            rows = [r for r in reader if r.get("config") != "classical"]
    missing = [c for c in ("config", "object_dice", "aji", "pixel_dice", "pq") if c not in header]
    if missing:
        raise SystemExit(f"{path}: header lacks {', '.join(missing)}; cannot record the classical row")
    new = {"config": "classical", "shift": "", "train_minutes": 0, "epochs": 0,
           **{m: f"{getattr(mean, m):.4f}" for m in ("object_dice", "aji", "pixel_dice", "pq")},
           **run_info(seed=None)}  # commit, seed (none: nothing random), machine
    header += [c for c in RUN_COLUMNS if c not in header]
    rows.append(new)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=header, restval="", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS_CSV, help="results CSV to record the row in")
    parser.add_argument("--no-record", action="store_true", help="print the table only")
    parser.add_argument("--smoke", action="store_true", help="one test image cropped to 256 px, not recorded")
    args = parser.parse_args()
    if not SPLIT_CSV.exists():
        if args.smoke:
            smoke_skip(f"MoNuSeg not found at {MONUSEG} (../shared/data is absent)")
        print(f"MoNuSeg not found at {MONUSEG} (../shared/data is absent); nothing to do.")
        return
    print(banner(seed=None))
    crop = 256 if args.smoke else None

    config = ClassicalConfig()
    print(f"classical pipeline, {asdict(config)}")
    print("| image | organ | object_dice | aji | pixel_dice | pq | n_gt | n_pred | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    scores, seconds = [], []
    for row in monuseg_test_rows()[: 1 if args.smoke else None]:
        rgb, gt = read_image(MONUSEG / row["image"])[:crop, :crop], read_labels(MONUSEG / row["label"])[:crop, :crop]
        t0 = time.perf_counter()
        pred = segment_classical(rgb, config)
        seconds.append(time.perf_counter() - t0)
        s = evaluate_image(gt, pred)
        scores.append(s)
        print(f"| {row['name']} | {row['organ']} | {s.object_dice:.4f} | {s.aji:.4f} | {s.pixel_dice:.4f} | "
              f"{s.pq:.4f} | {s.n_gt} | {s.n_pred} | {seconds[-1]:.2f} |")
    mean = mean_scores(scores)
    if args.smoke:
        return
    print(f"| **mean (14)** | | **{mean.object_dice:.4f}** | **{mean.aji:.4f}** | **{mean.pixel_dice:.4f}** | "
          f"**{mean.pq:.4f}** | {mean.n_gt} | {mean.n_pred} | {np.mean(seconds):.2f} |")
    print(f"segmentation time: {np.sum(seconds):.1f} s for 14 images ({np.mean(seconds):.2f} s per 1000x1000 image)")
    if not args.no_record:
        record(args.results, mean)
        print(f"recorded config=classical in {args.results}")


if __name__ == "__main__":
    sys.exit(main())
