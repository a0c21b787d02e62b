"""Segmentation metrics for one pair of instance maps: pixel Dice, object Dice, AJI and PQ.

Every metric is derived from one sparse overlap (contingency) table between the ground-truth and the predicted
instance ids, built once per image pair in O(pixels) with no per-object masks.

Definitions (``G_i`` ground-truth objects, ``S_j`` predicted objects, ``|.|`` area in pixels):

- **pixel Dice**: binary foreground Dice ``2 |G n S| / (|G| + |S|)`` with ``G = gt > 0`` and ``S = pred > 0``.
- **object Dice** (GlaS, Sirinukunwattana et al. 2017, as used by Qu et al. MIDL 2019 and PROnet Table 1):
  ``0.5 * [sum_i w_i Dice(G_i, S*(G_i)) + sum_j w~_j Dice(G*(S_j), S_j)]`` with ``w_i = |G_i| / sum_k |G_k|``,
  ``w~_j = |S_j| / sum_k |S_k|``; ``S*(G_i)`` is the predicted object with the largest intersection with
  ``G_i`` (Dice 0 when none overlaps), ``G*(S_j)`` symmetrically.
- **AJI** (Kumar et al. 2017): each ground-truth object is paired with the predicted object of largest IoU;
  ``sum_i |G_i n S*(G_i)| / (sum_i |G_i u S*(G_i)| + sum of the areas of predicted objects paired with no
  ground-truth object)``. A ground-truth object that overlaps nothing adds its area to the denominator only.
- **PQ** (Kirillov et al. 2019): pairs with IoU > 0.5 (unique by construction) are true positives;
  ``DQ = TP / (TP + FP / 2 + FN / 2)``, ``SQ = mean IoU of the true positives``, ``PQ = DQ * SQ``.

Conventions:

- An object is an id, whatever its shape: an id split into several connected parts is one object (no
  connected-component relabelling, unlike some GlaS scripts).
- Ties (equal intersection, or equal IoU for AJI) go to the smallest id.
- Empty cases: both maps empty -> every metric is 1.0 (nothing to find, nothing found); exactly one map empty
  -> every metric is 0.0. When both are non-empty but no pair has IoU > 0.5, DQ = SQ = PQ = 0.0.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

#: Metric names in report order; every one is a fraction in [0, 1].
METRIC_NAMES = ("object_dice", "pixel_dice", "aji", "pq", "dq", "sq")


@dataclass(frozen=True)
class OverlapTable:
    """Sparse contingency table between two instance maps of the same shape.

    Attributes
    ----------
    gt_ids, pred_ids : (G,), (P,) int64, the non-zero ids present, ascending.
    gt_areas, pred_areas : (G,), (P,) int64, pixel count of each id.
    gt_index, pred_index : (K,) int64, indices into ``gt_ids`` / ``pred_ids`` of each overlapping pair,
        sorted by (gt_index, pred_index).
    intersection : (K,) int64, number of pixels shared by each pair (> 0).
    """

    gt_ids: np.ndarray
    pred_ids: np.ndarray
    gt_areas: np.ndarray
    pred_areas: np.ndarray
    gt_index: np.ndarray
    pred_index: np.ndarray
    intersection: np.ndarray

    @property
    def n_gt(self) -> int:
        return int(self.gt_ids.size)

    @property
    def n_pred(self) -> int:
        return int(self.pred_ids.size)

    def union(self) -> np.ndarray:
        """(K,) int64 union area of each overlapping pair."""
        return self.gt_areas[self.gt_index] + self.pred_areas[self.pred_index] - self.intersection

    def iou(self) -> np.ndarray:
        """(K,) float64 IoU of each overlapping pair."""
        return self.intersection / self.union()


@dataclass(frozen=True)
class ImageScores:
    """All metrics for one image; fractions in [0, 1]. ``n_gt`` / ``n_pred`` count the objects."""

    object_dice: float
    pixel_dice: float
    aji: float
    pq: float
    dq: float
    sq: float
    n_gt: int
    n_pred: int


def _check_maps(gt: np.ndarray, pred: np.ndarray) -> None:
    for name, arr in (("gt", gt), ("pred", pred)):
        if arr.ndim != 2:
            raise ValueError(f"{name}: expected a 2-D (H, W) instance map, got shape {arr.shape}")
        if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
            raise ValueError(f"{name}: expected an integer instance map, got dtype {arr.dtype}")
        if arr.size and np.issubdtype(arr.dtype, np.signedinteger) and arr.min() < 0:
            raise ValueError(f"{name}: negative ids are not allowed (0 = background, objects > 0)")
    if gt.shape != pred.shape:
        raise ValueError(f"gt shape {gt.shape} != pred shape {pred.shape}; the maps must cover the same pixels")


def _compact(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Map ids to 0..n (0 stays background) -> (index per pixel, ids present > 0, area per id)."""
    flat = flat.astype(np.int64, copy=False)
    top = int(flat.max()) if flat.size else 0
    if top <= 4 * flat.size + 1024:  # dense ids: O(N) with a lookup table
        counts = np.bincount(flat, minlength=top + 1)
        counts[0] = 0
        ids = np.flatnonzero(counts)
        lut = np.zeros(top + 1, np.int64)
        lut[ids] = np.arange(1, ids.size + 1)
        return lut[flat], ids.astype(np.int64), counts[ids].astype(np.int64)
    uniq, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    if uniq[0] != 0:  # no background pixel: shift so index 0 stays background
        inverse = inverse + 1
        uniq, counts = np.concatenate([[0], uniq]), np.concatenate([[0], counts])
    return inverse.reshape(-1).astype(np.int64), uniq[1:].astype(np.int64), counts[1:].astype(np.int64)


def overlap_table(gt: np.ndarray, pred: np.ndarray) -> OverlapTable:
    """Build the sparse overlap table of two instance maps.

    Parameters
    ----------
    gt, pred : (H, W) integer (or bool) instance maps, 0 = background, ids > 0 need not be consecutive.
    """
    gt, pred = np.asarray(gt), np.asarray(pred)
    _check_maps(gt, pred)
    g, gt_ids, gt_areas = _compact(gt.ravel())
    p, pred_ids, pred_areas = _compact(pred.ravel())
    both = (g > 0) & (p > 0)
    n_cols = pred_ids.size
    keys = (g[both] - 1) * n_cols + (p[both] - 1)
    n_cells = gt_ids.size * n_cols
    if n_cells <= max(4 * keys.size, 1 << 20):  # small table: count densely in O(N)
        dense = np.bincount(keys, minlength=n_cells)
        cells = np.flatnonzero(dense)
        inter = dense[cells]
    else:
        cells, inter = np.unique(keys, return_counts=True)
    return OverlapTable(
        gt_ids=gt_ids, pred_ids=pred_ids, gt_areas=gt_areas, pred_areas=pred_areas,
        gt_index=(cells // max(n_cols, 1)).astype(np.int64), pred_index=(cells % max(n_cols, 1)).astype(np.int64),
        intersection=inter.astype(np.int64),
    )


def _best_per_group(group: np.ndarray, other: np.ndarray, value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each distinct ``group``, the entry with the largest ``value`` (ties: smallest ``other``).

    Returns (entry indices into the table, the groups they belong to), groups ascending.
    """
    if group.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.lexsort((other, -value, group))
    first = np.ones(order.size, bool)
    first[1:] = group[order][1:] != group[order][:-1]
    best = order[first]
    return best, group[best]


def _empty_case(table: OverlapTable) -> float | None:
    if table.n_gt == 0 and table.n_pred == 0:
        return 1.0
    if table.n_gt == 0 or table.n_pred == 0:
        return 0.0
    return None


def pixel_dice(table: OverlapTable) -> float:
    """Binary foreground Dice ``2 |G n S| / (|G| + |S|)``; both maps empty -> 1.0."""
    total = int(table.gt_areas.sum() + table.pred_areas.sum())
    if total == 0:
        return 1.0
    return float(2 * int(table.intersection.sum()) / total)


def object_dice(table: OverlapTable) -> float:
    """GlaS object-level Dice (see the module docstring); one map empty -> 0.0, both -> 1.0."""
    special = _empty_case(table)
    if special is not None:
        return special
    pair_dice = 2.0 * table.intersection / (table.gt_areas[table.gt_index] + table.pred_areas[table.pred_index])
    best, gi = _best_per_group(table.gt_index, table.pred_index, table.intersection)
    gt_term = float(np.sum(table.gt_areas[gi] * pair_dice[best]) / table.gt_areas.sum())
    best, pj = _best_per_group(table.pred_index, table.gt_index, table.intersection)
    pred_term = float(np.sum(table.pred_areas[pj] * pair_dice[best]) / table.pred_areas.sum())
    return 0.5 * (gt_term + pred_term)


def aji(table: OverlapTable) -> float:
    """Aggregated Jaccard Index (Kumar et al. 2017); one map empty -> 0.0, both -> 1.0."""
    special = _empty_case(table)
    if special is not None:
        return special
    best, gi = _best_per_group(table.gt_index, table.pred_index, table.iou())
    inter = int(table.intersection[best].sum())
    union = int(table.union()[best].sum())
    unmatched_gt = np.ones(table.n_gt, bool)
    unmatched_gt[gi] = False
    used_pred = np.zeros(table.n_pred, bool)
    used_pred[table.pred_index[best]] = True
    union += int(table.gt_areas[unmatched_gt].sum()) + int(table.pred_areas[~used_pred].sum())
    return float(inter / union)


def panoptic_quality(table: OverlapTable) -> tuple[float, float, float]:
    """(PQ, DQ, SQ) with matches at IoU > 0.5; one map empty -> zeros, both -> ones."""
    special = _empty_case(table)
    if special is not None:
        return special, special, special
    iou = table.iou()
    matched = iou > 0.5  # unique: two objects cannot both cover more than half of a third one's union
    tp = int(matched.sum())
    if tp == 0:
        return 0.0, 0.0, 0.0
    fp, fn = table.n_pred - tp, table.n_gt - tp
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = float(iou[matched].sum() / tp)
    return dq * sq, dq, sq


def evaluate_image(gt: np.ndarray, pred: np.ndarray) -> ImageScores:
    """Every metric for one (H, W) ground-truth / prediction pair of integer instance maps (0 = background)."""
    table = overlap_table(gt, pred)
    pq, dq, sq = panoptic_quality(table)
    return ImageScores(
        object_dice=object_dice(table), pixel_dice=pixel_dice(table), aji=aji(table),
        pq=pq, dq=dq, sq=sq, n_gt=table.n_gt, n_pred=table.n_pred,
    )


def mean_scores(scores: Iterable[ImageScores]) -> ImageScores:
    """Per-image mean of every metric (each image weighs the same); object counts are summed.

    Raises ValueError on an empty sequence.
    """
    scores = list(scores)
    if not scores:
        raise ValueError("mean_scores: no images to average")

    def mean(name: str) -> float:
        return float(np.mean([getattr(s, name) for s in scores]))

    return ImageScores(
        object_dice=mean("object_dice"), pixel_dice=mean("pixel_dice"), aji=mean("aji"),
        pq=mean("pq"), dq=mean("dq"), sq=mean("sq"),
        n_gt=int(sum(s.n_gt for s in scores)), n_pred=int(sum(s.n_pred for s in scores)),
    )


def evaluate_images(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[list[ImageScores], ImageScores]:
    """Score many (gt, pred) pairs -> (per-image scores, their mean as in :func:`mean_scores`)."""
    per_image = [evaluate_image(gt, pred) for gt, pred in pairs]
    return per_image, mean_scores(per_image)
