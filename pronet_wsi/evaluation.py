"""Score a folder of predicted instance maps against a folder of ground-truth instance maps.

Files are paired by stem (``<stem>.tif`` in the prediction folder with ``<stem>.png`` or ``<stem>.tif`` in the
ground-truth folder). Instance maps are PNG or TIFF (JPEG is lossy and refused). In the prediction folder the
side products of ``predict`` (``<stem>_overlay.png``) are skipped; files that are not PNG/TIFF/JPEG (e.g.
``config.json``) and hidden files are ignored in both folders. Every problem is an InputError naming the files.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pronet_wsi.errors import InputError
from pronet_wsi.files import atomic_write, check_report
from pronet_wsi.images import IMAGE_SUFFIXES, read_labels
from pronet_wsi.metrics import ImageScores, evaluate_image, mean_scores

LABEL_SUFFIXES = (".png", ".tif", ".tiff")
#: Stem endings of side products written next to predictions, never scored.
SKIPPED_PRED_ENDINGS = ("_overlay",)
#: CSV columns, in order.
CSV_COLUMNS = ("image", "object_dice", "pixel_dice", "aji", "pq")


@dataclass(frozen=True)
class ImagePair:
    """One prediction and its ground truth, paired by file stem."""

    stem: str
    pred_path: Path
    gt_path: Path


def _instance_maps(folder: Path, role: str, skip_endings: tuple[str, ...] = ()) -> dict[str, Path]:
    """Map stem -> path of the instance maps in ``folder``; errors on JPEGs and duplicate stems."""
    if not folder.exists():
        raise InputError(f"{folder}: {role} folder not found; check the path")
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder; give the folder of {role} instance maps")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        suffix = path.suffix.lower()
        if path.name.startswith(".") or not path.is_file() or suffix not in IMAGE_SUFFIXES:
            continue
        if path.stem.endswith(skip_endings):
            continue
        if suffix not in LABEL_SUFFIXES:
            raise InputError(f"{path}: JPEG is lossy and cannot hold an instance map; give PNG or TIFF")
        if path.stem in found:
            raise InputError(f"{found[path.stem]} and {path.name}: two {role} files with the same stem; keep one")
        found[path.stem] = path
    if not found:
        raise InputError(f"{folder}: {role} folder holds no instance maps ({', '.join(LABEL_SUFFIXES)})")
    return found


def _name_some(stems: list[str], limit: int = 5) -> str:
    more = f" and {len(stems) - limit} more" if len(stems) > limit else ""
    return ", ".join(stems[:limit]) + more


def pair_files(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike) -> list[ImagePair]:
    """Pair prediction and ground-truth instance maps by stem, sorted by stem.

    Raises InputError for a missing or empty folder, a JPEG, two files with one stem, or a prediction without
    ground truth. Ground truth without a prediction is left out (a ground-truth folder may hold a whole
    dataset while the predictions cover its test split); the CLI reports how many were scored.
    """
    preds = _instance_maps(Path(pred_dir), "prediction", SKIPPED_PRED_ENDINGS)
    gts = _instance_maps(Path(gt_dir), "ground-truth")
    no_gt = sorted(set(preds) - set(gts))
    if no_gt:
        raise InputError(f"{gt_dir}: no ground truth for prediction(s) {_name_some(no_gt)}; "
                         "ground truth must share the prediction's file stem")
    return [ImagePair(stem, preds[stem], gts[stem]) for stem in sorted(preds)]


def score_pair(pair: ImagePair) -> ImageScores:
    """Read both instance maps of ``pair`` and score them; a shape mismatch names both files."""
    pred = read_labels(pair.pred_path)
    gt = read_labels(pair.gt_path)
    for arr, path in ((gt, pair.gt_path), (pred, pair.pred_path)):
        check_instance_map(arr, path)
    if pred.shape != gt.shape:
        raise InputError(f"{pair.pred_path} {pred.shape} and {pair.gt_path} {gt.shape}: shapes differ; "
                         "a prediction must cover the same pixels as its ground truth")
    return evaluate_image(gt, pred)


def check_instance_map(labels: np.ndarray, path: Path) -> None:
    """A binary mask (one value, e.g. 0/255, over several separate objects) is not an instance map: InputError."""
    values = np.unique(labels)
    values = values[values != 0]
    if len(values) == 1:
        from scipy import ndimage as ndi

        n = ndi.label(labels > 0)[1]
        if n > 1:
            raise InputError(f"{path}: a binary mask (every pixel {int(values[0])}, {n} separate objects), not an "
                             "instance map; give each nucleus its own id (e.g. skimage.measure.label)")


def evaluate_folder(
    pred_dir: str | os.PathLike, gt_dir: str | os.PathLike
) -> tuple[list[tuple[str, ImageScores]], ImageScores]:
    """Score every prediction in ``pred_dir`` against ``gt_dir`` -> ([(stem, scores)], mean over images)."""
    rows = [(pair.stem, score_pair(pair)) for pair in pair_files(pred_dir, gt_dir)]
    return rows, mean_scores(s for _, s in rows)


def write_scores_csv(path: str | os.PathLike, rows: list[tuple[str, ImageScores]], mean: ImageScores) -> None:
    """Write ``image, object_dice, pixel_dice, aji, pq`` per image plus a last ``mean`` row, atomically."""
    path = Path(path)
    check_report(path, CSV_COLUMNS)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(CSV_COLUMNS)
            for name, s in [*rows, ("mean", mean)]:
                writer.writerow([name, *(f"{getattr(s, c):.6f}" for c in CSV_COLUMNS[1:])])

    atomic_write(Path(path), write)  # recognised as ours by its header (no note: the folder stays as it was)


def format_table(rows: list[tuple[str, ImageScores]], mean: ImageScores) -> str:
    """Plain-text table of the per-image scores and their mean (object counts: totals), for the terminal."""
    width = max(len("image"), *(len(name) for name, _ in rows))
    head = f"{'image':<{width}}  object_dice  pixel_dice     aji      pq    n_gt  n_pred"
    lines = [head, "-" * len(head)]
    for name, s in [*rows, ("mean", mean)]:
        if name == "mean":
            lines.append("-" * len(head))
        lines.append(f"{name:<{width}}  {s.object_dice:11.4f}  {s.pixel_dice:10.4f}  {s.aji:6.4f}  {s.pq:6.4f}"
                     f"  {s.n_gt:6d}  {s.n_pred:6d}")
    return "\n".join(lines)
