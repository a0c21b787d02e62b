"""Typed detection scores: predicted nucleus points with a class against class-labelled clicks.

Pure functions on arrays. Points are ``(N, 2)`` float (x, y) in one frame (level-0 continuous px, the frame of
every point file); classes are strings, ``""`` meaning *untyped* (a click with no class, or a nucleus the model
did not classify).

Definitions (HoVer-Net, Graham et al., Medical Image Analysis 58:101563, 2019, Sec. 4.3, as computed by
``run_nuclei_type_stat`` in github.com/vqdang/hover_net ``compute_stats.py``):

- **Matching**: one-to-one, optimal (Hungarian, :func:`scipy.optimize.linear_sum_assignment`) on Euclidean
  distances; a pair farther than ``radius_px`` is not a match (``distance <= radius_px`` is). HoVer-Net uses
  12 px at 0.25 um/px, i.e. 3 um. Unlike HoVer-Net's ``pair_coordinates``, which assigns on the full distance
  matrix and then drops far pairs, out-of-radius pairs cost more than any set of in-radius ones here, so the
  matching has the most possible pairs within the radius (and, among those, the least total distance). The two
  differ where HoVer-Net's assignment, forced to give every point of the smaller set a partner, spends a point
  on a partner beyond the radius and so breaks a good pair: with fewer predictions than nuclei that happens
  often (a false detection near a nucleus takes its partner, and the partner goes to a far nucleus).
  ``hovernet_pairing=True`` reproduces HoVer-Net's pairing for comparison with published numbers. Coordinates
  are not truncated to integers (HoVer-Net casts centroids to int32).
- **Detection**: ``TP_d`` matched pairs, ``FP_d`` unmatched predictions, ``FN_d`` unmatched ground truth, all
  nuclei whatever their class; ``F_d = 2 TP_d / (2 TP_d + FP_d + FN_d)``.
- **Per class c, matched pairs** (pairs whose ground truth is untyped are left out of every class, as
  HoVer-Net's ``exhaustive=False`` leaves out ground truth of type -1): ``TP_c`` both c; ``FP_c`` predicted c,
  true another class; ``FN_c`` true c, predicted another class or untyped; ``TN_c`` neither c.
  **Unmatched**: ``FP_d^c`` unmatched predictions of c, ``FN_d^c`` unmatched ground truth of c.
- **F_c** (HoVer-Net): ``2 (TP_c + TN_c) / (2 (TP_c + TN_c) + 2 FP_c + 2 FN_c + FP_d^c + FN_d^c)``. HoVer-Net's
  code counts TN_c only among the pairs where the truth or the prediction is c, so TN_c is always 0 there; this
  module does the same, which makes ``F_c = 2 TP_c / (2 TP_c + 2 FP_c + 2 FN_c + FP_d^c + FN_d^c)``.
- **Per-class precision / recall / F1** (the plain one-vs-rest detection scores of class c): true positives
  ``TP_c``; false positives ``FP_c + FP_d^c`` (a wrong class is a false positive of the predicted class...);
  false negatives ``FN_c + FN_d^c`` (...and a false negative of the true class).
- **Type accuracy** (HoVer-Net's ``acc_type``): the fraction of matched pairs with typed ground truth whose
  predicted class equals the true class.

Scores over a data set pool the counts of every image (:func:`pool_scores`), as HoVer-Net does, rather than
averaging per-image scores. Empty cases follow :mod:`pronet_wsi.metrics`: a ratio whose denominator is 0 is 1.0
when there is nothing to find and nothing found (no TP, FP or FN) and 0.0 otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from pronet_wsi.geometry import as_points_xy

#: HoVer-Net's matching radius, 12 px at 0.25 um/px.
DEFAULT_RADIUS_UM = 3.0


def _ratio(num: float, den: float, nothing: bool) -> float:
    """``num / den``; for ``den == 0``: 1.0 when there was nothing to find and nothing found, else 0.0."""
    if den > 0:
        return float(num) / float(den)
    return 1.0 if nothing else 0.0


def match_points(gt_xy: np.ndarray, pred_xy: np.ndarray, radius_px: float,
                 hovernet_pairing: bool = False) -> np.ndarray:
    """One-to-one matching of predicted to ground-truth points within ``radius_px``.

    Parameters
    ----------
    gt_xy : (N, 2) float, ground-truth (x, y).
    pred_xy : (M, 2) float, predicted (x, y), same frame and units as ``gt_xy``.
    radius_px : a pair is a match only when its distance is ``<= radius_px`` (> 0).
    hovernet_pairing : assign on the dense distance matrix, then drop pairs beyond the radius, exactly as
        HoVer-Net's ``pair_coordinates`` (fewer matches in some scenes; O(N M) memory).

    Returns
    -------
    pairs : (K, 2) int64, rows ``(gt_index, pred_index)``, each index at most once, sorted by gt_index. The
        matching has the largest possible K and, among matchings of that size, the smallest total distance.
        Points only interact through pairs within the radius, so the assignment is solved per connected group
        of nearby points (memory grows with the points, not their product).
    """
    if not (np.isfinite(radius_px) and radius_px > 0):
        raise ValueError(f"radius_px={radius_px}: must be a finite number > 0")
    gt, pred = as_points_xy(gt_xy, "gt_xy"), as_points_xy(pred_xy, "pred_xy")
    empty = np.zeros((0, 2), np.int64)
    if len(gt) == 0 or len(pred) == 0:
        return empty
    if hovernet_pairing:
        dense = np.hypot(gt[:, None, 0] - pred[None, :, 0], gt[:, None, 1] - pred[None, :, 1])
        rows, cols = linear_sum_assignment(dense)
        ok = dense[rows, cols] <= radius_px
        return np.stack([rows[ok], cols[ok]], axis=1).astype(np.int64).reshape(-1, 2)
    near = cKDTree(gt).sparse_distance_matrix(cKDTree(pred), radius_px, output_type="ndarray")  # keeps 0 distances
    gi, pj, dist = near["i"].astype(np.int64), near["j"].astype(np.int64), near["v"].astype(np.float64)
    keep = dist <= radius_px
    gi, pj, dist = gi[keep], pj[keep], dist[keep]
    if gi.size == 0:
        return empty
    # bipartite graph: gt nodes 0..N-1, pred nodes N..N+M-1; one assignment per connected component
    n = len(gt)
    graph = coo_matrix((np.ones(gi.size), (gi, pj + n)), shape=(n + len(pred), n + len(pred)))
    _, comp = connected_components(graph, directed=False)
    edge_comp = comp[gi]
    order = np.argsort(edge_comp, kind="stable")
    gi, pj, dist, edge_comp = gi[order], pj[order], dist[order], edge_comp[order]
    bounds = np.flatnonzero(np.diff(edge_comp)) + 1
    out = []
    for sl in np.split(np.arange(gi.size), bounds):
        g_ids, g_loc = np.unique(gi[sl], return_inverse=True)
        p_ids, p_loc = np.unique(pj[sl], return_inverse=True)
        if g_ids.size == 1 or p_ids.size == 1:  # a star: the nearest partner wins (first on ties)
            k = int(np.argmin(dist[sl]))
            out.append((int(gi[sl][k]), int(pj[sl][k])))
            continue
        # a pair beyond the radius costs more than every in-radius pair together: most matches first
        far = (min(g_ids.size, p_ids.size) + 1) * (radius_px + 1.0)
        cost = np.full((g_ids.size, p_ids.size), far)
        cost[g_loc, p_loc] = dist[sl]
        rows, cols = linear_sum_assignment(cost)
        ok = cost[rows, cols] < far
        out.extend(zip(g_ids[rows[ok]].tolist(), p_ids[cols[ok]].tolist(), strict=True))
    pairs = np.array(sorted(out), np.int64).reshape(-1, 2)
    return pairs


@dataclass(frozen=True)
class ClassCounts:
    """Counts of one class over matched and unmatched points, and the scores derived from them.

    ``tp`` matched, both of this class; ``fp_matched`` matched, predicted this class but truly another typed
    class; ``fn_matched`` matched, truly this class but predicted another class or untyped; ``fp_unmatched`` /
    ``fn_unmatched`` predictions / ground truth of this class with no partner. ``n_gt`` / ``n_pred``: all
    ground-truth / predicted points of this class (a prediction matched to untyped truth counts here only).
    """

    name: str
    tp: int = 0
    fp_matched: int = 0
    fn_matched: int = 0
    fp_unmatched: int = 0
    fn_unmatched: int = 0
    n_gt: int = 0
    n_pred: int = 0

    @property
    def fp(self) -> int:
        """False positives of the class: wrong class plus unmatched predictions of it."""
        return self.fp_matched + self.fp_unmatched

    @property
    def fn(self) -> int:
        """False negatives of the class: predicted as something else plus not detected."""
        return self.fn_matched + self.fn_unmatched

    @property
    def _nothing(self) -> bool:
        return self.tp + self.fp + self.fn == 0

    @property
    def precision(self) -> float:
        return _ratio(self.tp, self.tp + self.fp, self._nothing)

    @property
    def recall(self) -> float:
        return _ratio(self.tp, self.tp + self.fn, self._nothing)

    @property
    def f1(self) -> float:
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn, self._nothing)

    @property
    def f_c(self) -> float:
        """HoVer-Net's F_c (TN_c = 0, see the module docstring)."""
        den = 2 * self.tp + 2 * self.fp_matched + 2 * self.fn_matched + self.fp_unmatched + self.fn_unmatched
        return _ratio(2 * self.tp, den, self._nothing)

    def __add__(self, other: ClassCounts) -> ClassCounts:
        if other.name != self.name:
            raise ValueError(f"cannot add counts of class {other.name!r} to class {self.name!r}")
        return ClassCounts(self.name, *(getattr(self, f) + getattr(other, f) for f in _COUNT_FIELDS))


_COUNT_FIELDS = ("tp", "fp_matched", "fn_matched", "fp_unmatched", "fn_unmatched", "n_gt", "n_pred")


@dataclass(frozen=True)
class TypedScores:
    """Typed detection counts of one image (or pooled over images) and the scores derived from them.

    ``tp_d`` / ``fp_d`` / ``fn_d``: matched pairs, unmatched predictions, unmatched ground truth (all classes);
    ``n_typed_pairs``: matched pairs whose ground truth has a class; ``n_type_agree``: those whose predicted
    class equals it; ``per_class``: one :class:`ClassCounts` per scored class, in the order asked for.
    """

    tp_d: int
    fp_d: int
    fn_d: int
    n_typed_pairs: int
    n_type_agree: int
    per_class: tuple[ClassCounts, ...]

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.per_class)

    @property
    def _nothing(self) -> bool:
        return self.tp_d + self.fp_d + self.fn_d == 0

    @property
    def precision_d(self) -> float:
        return _ratio(self.tp_d, self.tp_d + self.fp_d, self._nothing)

    @property
    def recall_d(self) -> float:
        return _ratio(self.tp_d, self.tp_d + self.fn_d, self._nothing)

    @property
    def f_d(self) -> float:
        """Detection F1 over all nuclei, whatever their class."""
        return _ratio(2 * self.tp_d, 2 * self.tp_d + self.fp_d + self.fn_d, self._nothing)

    @property
    def type_accuracy(self) -> float:
        """Fraction of matched, typed ground truth given the right class (1.0 when there is none)."""
        return _ratio(self.n_type_agree, self.n_typed_pairs, True)

    @property
    def mean_f1(self) -> float:
        """Mean over the scored classes of the per-class F1 (NaN when no class is scored)."""
        return float(np.mean([c.f1 for c in self.per_class])) if self.per_class else float("nan")

    @property
    def mean_f_c(self) -> float:
        """Mean over the scored classes of HoVer-Net's F_c (NaN when no class is scored)."""
        return float(np.mean([c.f_c for c in self.per_class])) if self.per_class else float("nan")

    def of(self, name: str) -> ClassCounts:
        """The counts of class ``name``."""
        for c in self.per_class:
            if c.name == name:
                return c
        raise KeyError(f"class {name!r} is not scored; scored classes: {', '.join(self.classes)}")


def _as_classes(classes: Sequence[str] | np.ndarray, n: int, name: str) -> np.ndarray:
    arr = np.asarray([str(c) for c in classes], dtype=object)
    if arr.shape != (n,):
        raise ValueError(f"{name} has {arr.size} entries for {n} points; give one class per point ('' = untyped)")
    return arr


def score_typed(gt_xy: np.ndarray, gt_cls: Sequence[str] | np.ndarray, pred_xy: np.ndarray,
                pred_cls: Sequence[str] | np.ndarray, radius_px: float, classes: Sequence[str],
                hovernet_pairing: bool = False) -> TypedScores:
    """Match predicted to ground-truth points and count typed detection outcomes for one image.

    Parameters
    ----------
    gt_xy : (N, 2) float, ground-truth (x, y).
    gt_cls : (N,) str, class of each ground-truth point; ``""`` = untyped (counts for detection only).
    pred_xy : (M, 2) float, predicted (x, y), same frame as ``gt_xy``.
    pred_cls : (M,) str, predicted class of each point; ``""`` = no class.
    radius_px : matching radius in the points' units (HoVer-Net: 12 px at 0.25 um/px).
    classes : the class names to score, in report order (non-empty names, no duplicates). Points of other
        classes still count for detection and as "another class" for every scored class.
    hovernet_pairing : pair as HoVer-Net's code does (see :func:`match_points`).

    Returns
    -------
    TypedScores; pool several images' with :func:`pool_scores`.
    """
    names = [str(c) for c in classes]
    if any(not c for c in names) or len(set(names)) != len(names):
        raise ValueError(f"classes={names!r}: give distinct, non-empty class names")
    gt, pred = as_points_xy(gt_xy, "gt_xy"), as_points_xy(pred_xy, "pred_xy")
    gcls, pcls = _as_classes(gt_cls, len(gt), "gt_cls"), _as_classes(pred_cls, len(pred), "pred_cls")
    pairs = match_points(gt, pred, radius_px, hovernet_pairing)
    g_un = np.ones(len(gt), bool)
    p_un = np.ones(len(pred), bool)
    g_un[pairs[:, 0]] = False
    p_un[pairs[:, 1]] = False
    pt, pp = gcls[pairs[:, 0]], pcls[pairs[:, 1]]
    typed = pt != ""
    pt, pp = pt[typed], pp[typed]  # pairs with untyped truth count for detection only
    per_class = []
    for c in names:
        per_class.append(ClassCounts(
            c,
            tp=int(((pt == c) & (pp == c)).sum()),
            fp_matched=int(((pt != c) & (pp == c)).sum()),
            fn_matched=int(((pt == c) & (pp != c)).sum()),
            fp_unmatched=int((pcls[p_un] == c).sum()),
            fn_unmatched=int((gcls[g_un] == c).sum()),
            n_gt=int((gcls == c).sum()),
            n_pred=int((pcls == c).sum()),
        ))
    return TypedScores(tp_d=len(pairs), fp_d=int(p_un.sum()), fn_d=int(g_un.sum()),
                       n_typed_pairs=int(typed.sum()), n_type_agree=int((pt == pp).sum()),
                       per_class=tuple(per_class))


def pool_scores(scores: Iterable[TypedScores]) -> TypedScores:
    """Sum the counts of several images' :class:`TypedScores` (same classes, same order) into one."""
    items = list(scores)
    if not items:
        raise ValueError("no scores to pool; score at least one image")
    classes = items[0].classes
    for s in items[1:]:
        if s.classes != classes:
            raise ValueError(f"classes differ between images: {s.classes} vs {classes}; score with one class list")
    per_class = list(items[0].per_class)
    for s in items[1:]:
        per_class = [a + b for a, b in zip(per_class, s.per_class, strict=True)]
    return TypedScores(
        tp_d=sum(s.tp_d for s in items), fp_d=sum(s.fp_d for s in items), fn_d=sum(s.fn_d for s in items),
        n_typed_pairs=sum(s.n_typed_pairs for s in items), n_type_agree=sum(s.n_type_agree for s in items),
        per_class=tuple(per_class))
