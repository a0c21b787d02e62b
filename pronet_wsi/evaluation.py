"""Score a folder of predicted instance maps against a folder of ground-truth instance maps.

Files are paired by stem (``<stem>.tif`` in the prediction folder with ``<stem>.png`` or ``<stem>.tif`` in the
ground-truth folder). Instance maps are PNG or TIFF (JPEG is lossy and refused). In the prediction folder the
side products of ``predict`` (``<stem>_overlay.png``) are skipped; files that are not PNG/TIFF/JPEG (e.g.
``config.json``) and hidden files are ignored in both folders. Every problem is an InputError naming the files.

**Typed detection** (:func:`evaluate_typed_folder`): when the prediction folder holds ``<stem>_nuclei.csv``
tables (``id,x,y,class,...``, x/y in the image's continuous pixel frame, as ``predict`` writes them) and the
ground-truth folder holds point files ``<stem>.csv`` (``x,y[,class]``) or ``<stem>.geojson`` (QuPath points,
class = ``classification.name``), predicted nucleus points are matched to the clicks and scored per class with
:mod:`pronet_wsi.detection` (counts pooled over all images, as HoVer-Net does).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pronet_wsi.detection import TypedScores, pool_scores, score_typed
from pronet_wsi.errors import InputError
from pronet_wsi.files import atomic_write, check_report
from pronet_wsi.images import IMAGE_SUFFIXES, LABEL_SUFFIXES, read_labels
from pronet_wsi.metrics import ImageScores, evaluate_image, mean_scores
from pronet_wsi.training.points import read_points_classes

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


# --- typed detection: nucleus tables against class-labelled clicks ---

#: File-name ending of the per-image nucleus table that ``predict`` writes.
NUCLEI_ENDING = "_nuclei.csv"
POINT_ENDINGS = (".csv", ".geojson", ".json", ".geojson.gz", ".json.gz")
#: Typed CSV columns, in order.
TYPED_CSV_COLUMNS = ("class", "n_gt", "n_pred", "tp", "fp", "fn", "precision", "recall", "f1", "f_c")


def has_nucleus_tables(pred_dir: str | os.PathLike) -> bool:
    """True when ``pred_dir`` is a folder holding at least one ``<stem>_nuclei.csv``."""
    folder = Path(pred_dir)
    return folder.is_dir() and any(p.name.endswith(NUCLEI_ENDING) and not p.name.startswith(".")
                                   for p in folder.iterdir())


def _point_stem(path: Path) -> str | None:
    name = path.name
    ending = next((e for e in sorted(POINT_ENDINGS, key=len, reverse=True) if name.lower().endswith(e)), None)
    return None if ending is None else name[: len(name) - len(ending)]


def has_point_files(gt_dir: str | os.PathLike) -> bool:
    """True when ``gt_dir`` is a folder holding at least one point file (CSV or GeoJSON)."""
    folder = Path(gt_dir)
    return folder.is_dir() and any(p.is_file() and not p.name.startswith(".") and _point_stem(p)
                                   for p in folder.iterdir())


def pair_point_files(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike) -> list[ImagePair]:
    """Pair ``<stem>_nuclei.csv`` predictions with ``<stem>.csv`` / ``<stem>.geojson`` clicks, sorted by stem.

    Ground truth without a prediction is left out; a prediction without ground truth, or two ground-truth
    point files with one stem, is an InputError.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for folder, role in ((pred_dir, "prediction"), (gt_dir, "ground-truth")):
        if not folder.exists():
            raise InputError(f"{folder}: {role} folder not found; check the path")
        if not folder.is_dir():
            raise InputError(f"{folder}: not a folder; give the folder of {role} files")
    preds = {p.name[: -len(NUCLEI_ENDING)]: p for p in sorted(pred_dir.iterdir())
             if p.is_file() and p.name.endswith(NUCLEI_ENDING) and not p.name.startswith(".")}
    if not preds:
        raise InputError(f"{pred_dir}: no <stem>{NUCLEI_ENDING} nucleus tables; run `pronet-wsi predict` first")
    gts: dict[str, Path] = {}
    for path in sorted(gt_dir.iterdir()):
        stem = _point_stem(path)
        if stem is None or path.name.startswith(".") or not path.is_file():
            continue
        if stem in gts:
            raise InputError(f"{gts[stem]} and {path.name}: two ground-truth point files with the same stem; "
                             "keep one")
        gts[stem] = path
    no_gt = sorted(set(preds) - set(gts))
    if no_gt:
        raise InputError(f"{gt_dir}: no point file for prediction(s) {_name_some(no_gt)}; ground truth must be "
                         f"<stem>.csv or <stem>.geojson for <stem>{NUCLEI_ENDING}")
    return [ImagePair(stem, preds[stem], gts[stem]) for stem in sorted(preds)]


@dataclass(frozen=True)
class TypedResult:
    """Typed detection over a folder: per-image and pooled scores, and the predicted classes never clicked."""

    rows: list[tuple[str, TypedScores]]
    pooled: TypedScores
    unknown_pred_classes: tuple[str, ...]


def evaluate_typed_folder(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike, radius_px: float,
                          classes: tuple[str, ...] | None = None) -> TypedResult:
    """Score every ``<stem>_nuclei.csv`` in ``pred_dir`` against the clicks in ``gt_dir``.

    Parameters
    ----------
    radius_px : matching radius in the images' pixels (``--radius-um / --mpp`` in the CLI).
    classes : classes to score, in report order; default: every class named in the ground truth, sorted.
    """
    if not radius_px > 0:
        raise InputError(f"matching radius {radius_px:g} px: must be > 0; check --radius-um and --mpp")
    data = []
    for pair in pair_point_files(pred_dir, gt_dir):
        gt_xy, gt_cls = read_points_classes(pair.gt_path)
        pred_xy, pred_cls = read_points_classes(pair.pred_path)
        data.append((pair.stem, gt_xy, gt_cls, pred_xy, pred_cls))
    gt_names = {c for _, _, g, _, _ in data for c in g if c}
    pred_names = {c for _, _, _, _, p in data for c in p if c}
    scored = tuple(sorted(gt_names)) if classes is None else classes
    rows = [(stem, score_typed(gxy, gcls, pxy, pcls, radius_px, scored)) for stem, gxy, gcls, pxy, pcls in data]
    return TypedResult(rows, pool_scores(s for _, s in rows), tuple(sorted(pred_names - set(scored))))


def _typed_table_rows(pooled: TypedScores) -> list[tuple[str, str, str, str, str, str, float, float, float, str]]:
    rows: list[tuple[str, str, str, str, str, str, float, float, float, str]] = []
    for c in pooled.per_class:
        rows.append((c.name, str(c.n_gt), str(c.n_pred), str(c.tp), str(c.fp), str(c.fn), c.precision, c.recall,
                     c.f1, f"{c.f_c:.6f}"))
    if pooled.per_class:
        rows.append(("mean", "", "", "", "", "", float(np.mean([c.precision for c in pooled.per_class])),
                     float(np.mean([c.recall for c in pooled.per_class])), pooled.mean_f1, f"{pooled.mean_f_c:.6f}"))
    n_gt, n_pred = pooled.tp_d + pooled.fn_d, pooled.tp_d + pooled.fp_d
    rows.append(("detection", str(n_gt), str(n_pred), str(pooled.tp_d), str(pooled.fp_d), str(pooled.fn_d),
                 pooled.precision_d, pooled.recall_d, pooled.f_d, ""))
    return rows


def format_typed_table(result: TypedResult) -> str:
    """Plain-text table: one row per class (P, R, F1, HoVer-Net F_c), their mean, and detection (F1 = F_d)."""
    rows = _typed_table_rows(result.pooled)
    width = max(len("class"), *(len(r[0]) for r in rows))
    head = (f"{'class':<{width}}  {'n_gt':>6}  {'n_pred':>6}  {'tp':>6}  {'fp':>6}  {'fn':>6}  precision  recall"
            "      f1     f_c")
    lines = [head, "-" * len(head)]
    for name, n_gt, n_pred, tp, fp, fn, p, r, f1, f_c in rows:
        if name in ("mean", "detection"):
            lines.append("-" * len(head))
        f_c_text = f"{float(f_c):6.4f}" if f_c else ""
        lines.append(f"{name:<{width}}  {n_gt:>6}  {n_pred:>6}  {tp:>6}  {fp:>6}  {fn:>6}  {p:9.4f}  {r:6.4f}"
                     f"  {f1:6.4f}  {f_c_text:>6}".rstrip())
    pooled = result.pooled
    lines.append(f"F_d {pooled.f_d:.4f}  type accuracy {pooled.type_accuracy:.4f} "
                 f"({pooled.n_typed_pairs} matched, typed nuclei)")
    return "\n".join(lines)


def write_typed_csv(path: str | os.PathLike, result: TypedResult) -> None:
    """Write ``class, n_gt, n_pred, tp, fp, fn, precision, recall, f1, f_c`` per class, ``mean`` and
    ``detection`` (whose f1 is F_d) rows, atomically."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give a CSV file name such as {path / 'typed_scores.csv'}")

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(TYPED_CSV_COLUMNS)
            for name, n_gt, n_pred, tp, fp, fn, p, r, f1, f_c in _typed_table_rows(result.pooled):
                writer.writerow([name, n_gt, n_pred, tp, fp, fn, f"{p:.6f}", f"{r:.6f}", f"{f1:.6f}", f_c])

    atomic_write(path, write)
