"""Maps -> instances: centre peaks, then paper Eq. 1 (each foreground pixel joins the centre nearest to
its own position plus its predicted offset)."""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
from scipy import ndimage as ndi

from pronet_wsi.classify import NucleusClassifier, classify
from pronet_wsi.errors import InputError

GROUPINGS = ("offsets", "nearest_center", "components")


@dataclass(frozen=True)
class PostprocessConfig:
    """Thresholds for turning maps into instances (tuned on validation; stored in ``thresholds.json``).

    grouping : ``offsets`` = paper Eq. 1; ``nearest_center`` = each pixel joins its nearest centre
    (the ablation without an offset module); ``components`` = connected components of the mask
    (the Qu et al. 2019 baseline).
    class_weights : typed models: each class's mean probability is multiplied by its weight (then renormalised)
    before the arg-max; tuned on the held-back clicks by ``train`` (empty = 1 for every class).
    nucleus_classifier : typed models: each nucleus's class from a logistic regression on its class probabilities,
    shape and stain (:mod:`pronet_wsi.classify`) instead of the arg-max; fitted by ``train`` when it beats the
    head on the held-back clicks (None = the head's arg-max with ``class_weights``).
    """

    center_threshold: float = 0.2
    foreground_threshold: float = 0.5
    min_area_px: int = 10
    nms_px: int = 3
    grouping: str = "offsets"
    class_weights: tuple[float, ...] = ()
    nucleus_classifier: NucleusClassifier | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_weights", tuple(float(w) for w in self.class_weights))
        if isinstance(self.nucleus_classifier, dict):  # read from thresholds.json
            object.__setattr__(self, "nucleus_classifier", NucleusClassifier.from_json(self.nucleus_classifier))
        if not all(0 < w < float("inf") for w in self.class_weights):
            raise InputError(f"class_weights={self.class_weights}: must be finite numbers > 0")
        if not 0.0 < self.center_threshold < 1.0:
            raise InputError(f"center_threshold={self.center_threshold}: must be in (0, 1)")
        if not 0.0 < self.foreground_threshold < 1.0:
            raise InputError(f"foreground_threshold={self.foreground_threshold}: must be in (0, 1)")
        if not self.min_area_px >= 0 or self.min_area_px == float("inf"):  # NaN fails the first test
            raise InputError(f"min_area_px={self.min_area_px}: must be a number >= 0")
        if self.grouping not in GROUPINGS:
            raise InputError(f"grouping={self.grouping!r}: must be one of {', '.join(GROUPINGS)}")
        if not self.nms_px >= 1 or not float(self.nms_px).is_integer() or self.nms_px % 2 == 0:
            raise InputError(f"nms_px={self.nms_px}: must be an odd integer >= 1")


@dataclass(frozen=True)
class Segmentation:
    """Instances of one image or tile.

    labels : (H, W) uint32, 0 = background, ids 1..N.
    centers_rc : (N, 2) float64, (row, col) centre of instance i + 1 in the array frame.
    center_scores : (N,) float32, centre-heatmap probability at that centre (0 for fragments without a peak).
    type_probs : (N, K) float32, mean class probability over each instance's pixels (typed models), or None.
    """

    labels: np.ndarray
    centers_rc: np.ndarray
    center_scores: np.ndarray
    type_probs: np.ndarray | None = None

    @property
    def n(self) -> int:
        return len(self.centers_rc)

    @property
    def class_index(self) -> np.ndarray:
        """(N,) int64: each instance's class (arg-max of its mean class probability), -1 for an untyped model."""
        if self.type_probs is None:
            return np.full(self.n, -1, np.int64)
        return np.argmax(self.type_probs, axis=1).astype(np.int64) if self.n else np.zeros(0, np.int64)

    @property
    def class_prob(self) -> np.ndarray:
        """(N,) float32: the mean probability of that class (NaN for an untyped model)."""
        if self.type_probs is None:
            return np.full(self.n, np.nan, np.float32)
        return self.type_probs.max(axis=1).astype(np.float32) if self.n else np.zeros(0, np.float32)


def reweight_classes(probs: np.ndarray, weights: tuple[float, ...]) -> np.ndarray:
    """(N, K) class probabilities times per-class ``weights``, renormalised (a prior shift: weights tuned on
    held-back clicks let a rare class win where its probability is close; () leaves them as they are)."""
    if not weights or not len(probs):
        return probs
    if len(weights) != probs.shape[1]:
        raise ValueError(f"class_weights has {len(weights)} values for {probs.shape[1]} classes")
    w = probs * np.asarray(weights, np.float32)
    return (w / np.maximum(w.sum(axis=1, keepdims=True), 1e-12)).astype(np.float32)


def mean_type_probs(labels: np.ndarray, types: np.ndarray) -> np.ndarray:
    """(N, K) float32 mean of each class probability over the pixels of instances 1..N of ``labels``.

    types : (K, H, W) class probabilities. An id without pixels gets a uniform row.
    """
    n = int(labels.max()) if labels.size else 0
    k = types.shape[0]
    if n == 0:
        return np.zeros((0, k), np.float32)
    count, sums = _class_sums(np.ascontiguousarray(labels), np.ascontiguousarray(types, np.float32), n)
    count, sums = count[1:], sums[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        probs = np.where(count[:, None] > 0, sums / count[:, None], 1.0 / k)
    return probs.astype(np.float32)


@numba.njit(cache=True, nogil=True)
def _class_sums(labels: np.ndarray, types: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel count (n + 1,) and per-class probability sums (n + 1, K) of labels 0..n, in raster order (as
    ``np.bincount`` sums them; one pass instead of one per class)."""
    k = types.shape[0]
    count = np.zeros(n + 1)
    sums = np.zeros((n + 1, k))
    h, w = labels.shape
    for r in range(h):
        for c in range(w):
            i = labels[r, c]
            if i < 0 or i > n:
                continue
            count[i] += 1.0
            for j in range(k):
                sums[i, j] += types[j, r, c]
    return count, sums


def find_centers(centers: np.ndarray, config: PostprocessConfig = PostprocessConfig()) -> np.ndarray:
    """Local maxima of the centre heatmap above the threshold.

    Parameters
    ----------
    centers : (H, W) float, centre-heatmap probability.

    Returns
    -------
    (N, 2) float64 (row, col) peaks; a plateau of equal maxima gives one peak at its centroid.
    """
    peak = local_maxima(centers, config.nms_px, centers > config.center_threshold)
    return _plateau_centroids(peak)


@numba.njit(cache=True, nogil=True)
def _plateau_centroids(peak):
    """(N, 2) float64 centroids of the 8-connected groups of ``peak`` pixels, in raster order of each group's
    first pixel (the order of ``ndi.label``'s ids); union-find as in :func:`_label_equal`."""
    h, w = peak.shape
    lab = np.zeros((h, w), np.int32)
    parent = np.zeros(1024, np.int32)
    n = 0
    for i in range(h):
        for j in range(w):
            if not peak[i, j]:
                continue
            best = 0
            for a, b in ((i - 1, j - 1), (i - 1, j), (i - 1, j + 1), (i, j - 1)):
                if a < 0 or b < 0 or b >= w or lab[a, b] == 0:
                    continue
                root = _find(parent, lab[a, b])
                if best == 0:
                    best = root
                elif root != best:
                    lo, hi = min(root, best), max(root, best)
                    parent[hi] = lo
                    best = lo
            if best == 0:
                n += 1
                parent = _with_label(parent, n)
                best = n
            lab[i, j] = best
    final, count = _number_roots(parent, n)
    sums = np.zeros((count, 3))
    for i in range(h):
        for j in range(w):
            if lab[i, j]:
                f = final[lab[i, j]] - 1
                sums[f, 0] += 1.0
                sums[f, 1] += i
                sums[f, 2] += j
    out = np.empty((count, 2))
    for f in range(count):
        out[f, 0] = sums[f, 1] / sums[f, 0]
        out[f, 1] = sums[f, 2] / sums[f, 0]
    return out


def local_maxima(values: np.ndarray, size: int, candidates: np.ndarray) -> np.ndarray:
    """``values == maximum_filter(values, size, mode="nearest")`` where ``candidates`` (bool), False elsewhere.

    The same peaks as the filter over the whole tile, compared only at the candidate pixels (those above the
    centre threshold, a few percent of a tile), each against its in-image neighbours (with ``nearest`` the
    window's outside repeats pixels inside it).
    """
    return _local_maxima(np.ascontiguousarray(values, np.float32), size // 2, np.ascontiguousarray(candidates, bool))


@numba.njit(cache=True, nogil=True)
def _local_maxima(values, r, candidates):
    h, w = values.shape
    out = np.zeros((h, w), np.bool_)
    for i in range(h):
        for j in range(w):
            if not candidates[i, j]:
                continue
            v = values[i, j]
            peak = True
            for a in range(max(i - r, 0), min(i + r, h - 1) + 1):
                for b in range(max(j - r, 0), min(j + r, w - 1) + 1):
                    if values[a, b] > v:
                        peak = False
                        break
                if not peak:
                    break
            out[i, j] = peak
    return out


# Votes land within a few px of their centre, so the search looks at the centres of the vote's own grid cell and
# the cells around it first, and goes further out only while a nearer centre could still be there. Exact.
_CELL_PX = 8.0


def group_pixels(foreground: np.ndarray, offsets: np.ndarray, centers_rc: np.ndarray) -> np.ndarray:
    """Paper Eq. 1: each foreground pixel joins the centre nearest to (row, col) + offset.

    Parameters
    ----------
    foreground : (H, W) bool mask.
    offsets : (2, H, W) float, (dy, dx) px from each pixel to its nucleus centre.
    centers_rc : (N, 2) float centres.

    Returns
    -------
    (H, W) int32, 0 = background or no centre, i + 1 = joined ``centers_rc[i]`` (of equally near centres, the
    first).
    """
    if len(centers_rc) == 0:
        return np.zeros(foreground.shape, np.int32)
    return _group_pixels(np.ascontiguousarray(foreground, bool), np.ascontiguousarray(offsets, np.float32),
                         np.ascontiguousarray(centers_rc, np.float64), _CELL_PX)


@numba.njit(cache=True, nogil=True)
def _group_pixels(foreground, offsets, centers, cell):
    """:func:`group_pixels` in one pass over the pixels (votes in float64, as numpy's int + float32 gives)."""
    y0, x0, gh, gw, order, start = _centre_grid(centers, cell)
    h, w = foreground.shape
    out = np.zeros((h, w), np.int32)  # int32: a tile's fresh int64 array cost ~10 ms more in page faults
    for i in range(h):
        for j in range(w):
            if foreground[i, j]:
                y = np.float64(i) + np.float64(offsets[0, i, j])
                x = np.float64(j) + np.float64(offsets[1, i, j])
                out[i, j] = _nearest(y, x, centers, cell, y0, x0, gh, gw, order, start) + 1
    return out


@numba.njit(cache=True, nogil=True)
def _centre_grid(centers, cell):
    """The centres binned in a grid of ``cell`` px: origin, shape, the centres' order by cell (index order within
    a cell) and each cell's start in it."""
    n = centers.shape[0]
    y0, x0 = centers[:, 0].min(), centers[:, 1].min()
    gh = int((centers[:, 0].max() - y0) / cell) + 1
    gw = int((centers[:, 1].max() - x0) / cell) + 1
    key = np.empty(n, np.int64)
    for j in range(n):
        key[j] = int((centers[j, 0] - y0) / cell) * gw + int((centers[j, 1] - x0) / cell)
    order = np.argsort(key, kind="mergesort")
    start = np.zeros(gh * gw + 1, np.int64)
    for j in range(n):
        start[key[j] + 1] += 1
    for c in range(gh * gw):
        start[c + 1] += start[c]
    return y0, x0, gh, gw, order, start


@numba.njit(cache=True, nogil=True, inline="always")
def _nearest(y, x, centers, cell, y0, x0, gh, gw, order, start):
    """Index of the centre nearest to ``(y, x)``: rings of cells around the vote's own, until no unsearched cell
    can hold a nearer centre (a cell in ring r + 1 is at least r * cell away); ties to the lower index."""
    qy = int(np.floor((y - y0) / cell))
    qx = int(np.floor((x - x0) / cell))
    best, bi = np.inf, -1
    r = max(0, -qy, qy - (gh - 1), -qx, qx - (gw - 1))  # rings nearer than this hold no cell of the grid
    while True:
        for gy in range(max(qy - r, 0), min(qy + r, gh - 1) + 1):
            if gy == qy - r or gy == qy + r:  # the ring's first and last rows: all its cells
                lo, hi, step = max(qx - r, 0), min(qx + r, gw - 1), 1
            else:  # the rows between: its two end cells
                lo, hi, step = qx - r, qx + r, 2 * r
            for gx in range(lo, hi + 1, step):
                if gx < 0 or gx >= gw:
                    continue
                c = gy * gw + gx
                for k in range(start[c], start[c + 1]):
                    j = order[k]
                    d = (y - centers[j, 0]) ** 2 + (x - centers[j, 1]) ** 2
                    if d < best or (d == best and j < bi):
                        best, bi = d, j
        if bi >= 0 and best <= (r * cell) ** 2:
            return bi
        if qy - r <= 0 and qy + r >= gh - 1 and qx - r <= 0 and qx + r >= gw - 1:
            return bi  # the whole grid searched
        r += 1


def postprocess(maps: dict[str, np.ndarray], config: PostprocessConfig = PostprocessConfig(),
                image: np.ndarray | None = None) -> Segmentation:
    """Instances from one tile's maps (``image``: the RGB pixels they came from, which a ``nucleus_classifier``
    needs).

    ``maps`` holds ``foreground`` (H, W) probability, ``offsets`` (2, H, W) (dy, dx) px and ``centers``
    (H, W) probability, and for a typed model ``types`` (K, H, W) class probabilities (each instance's class is
    the arg-max of its mean class probability). Each centre keeps its largest connected piece; other pieces of at least
    ``min_area_px`` become instances of their own (a nucleus whose centre peak was missed), smaller ones
    are dropped.
    """
    centers_map = np.asarray(maps["centers"], np.float32)
    fg = np.asarray(maps["foreground"]) > config.foreground_threshold
    if config.grouping == "components":
        assigned = ndi.label(fg)[0]
        peaks = instance_centroids_rc(assigned)
    else:
        peaks = find_centers(centers_map, config)
        offsets = np.asarray(maps["offsets"], np.float32)
        if config.grouping == "nearest_center":
            offsets = np.zeros_like(offsets)
        assigned = group_pixels(fg, offsets, peaks)
    # connected pieces of constant assignment (4-connectivity), their areas and owner centres
    pieces, area, owner = _pieces(assigned)
    n_pieces = len(area)
    types = maps.get("types")
    if n_pieces == 0:
        empty_types = None if types is None else np.zeros((0, types.shape[0]), np.float32)
        return Segmentation(np.zeros(fg.shape, np.uint32), np.zeros((0, 2)), np.zeros(0, np.float32), empty_types)
    # largest piece per owner centre
    order = np.lexsort((-area, owner))
    first = np.ones(n_pieces, bool)
    first[1:] = owner[order][1:] != owner[order][:-1]
    is_main = np.zeros(n_pieces, bool)
    is_main[order[first]] = True
    keep = area >= max(config.min_area_px, 1)
    new_id = np.zeros(n_pieces + 1, np.uint32)
    kept = np.nonzero(keep)[0]
    new_id[kept + 1] = np.arange(1, len(kept) + 1, dtype=np.uint32)
    labels = new_id[pieces]
    n = len(kept)
    centers_rc = np.zeros((n, 2))
    scores = np.zeros(n, np.float32)
    main = is_main[kept]
    centers_rc[main] = peaks[owner[kept[main]] - 1]
    ri = np.clip(np.rint(centers_rc[main]).astype(np.int64), 0, np.array(fg.shape) - 1)
    scores[main] = centers_map[ri[:, 0], ri[:, 1]]
    if (~main).any():
        centers_rc[~main] = _fragment_centroids(labels, ~main)
    type_probs = None
    if types is not None:
        type_probs = mean_type_probs(labels, np.asarray(types, np.float32))
        if config.nucleus_classifier is not None:
            if image is None:
                raise ValueError("a nucleus_classifier needs the image: postprocess(maps, config, image)")
            type_probs = classify(image, labels, type_probs, config.nucleus_classifier)
        else:
            type_probs = reweight_classes(type_probs, config.class_weights)
    return Segmentation(labels, centers_rc, scores, type_probs)


def _fragment_centroids(labels: np.ndarray, fragment: np.ndarray) -> np.ndarray:
    """(F, 2) float64 (row, col) centroids of the instances ``i + 1`` where ``fragment[i]``, in id order.

    Sums over the fragments' own pixels (``ndi.center_of_mass`` with an index list passes over the whole tile per
    axis; fragments are a few hundred pixels of millions). Every id in ``fragment`` must have pixels.
    """
    is_frag = np.concatenate([[False], fragment])
    idx = np.flatnonzero(is_frag[labels])
    ids = labels.ravel()[idx].astype(np.int64)
    rows, cols = np.divmod(idx, labels.shape[1])
    n = len(fragment) + 1
    count = np.bincount(ids, minlength=n)
    sel = np.nonzero(fragment)[0] + 1
    return np.stack([np.bincount(ids, weights=rows, minlength=n)[sel] / count[sel],
                     np.bincount(ids, weights=cols, minlength=n)[sel] / count[sel]], axis=1)


def instance_centroids_rc(labels: np.ndarray) -> np.ndarray:
    """(N, 2) float64 (row, col) centroids of ids 1..max(labels) (NaN for absent ids)."""
    n = int(labels.max()) if labels.size else 0
    if n == 0:
        return np.zeros((0, 2))
    rows, cols = np.indices(labels.shape)
    flat = labels.ravel().astype(np.int64)
    count = np.bincount(flat, minlength=n + 1)[1:].astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.stack([np.bincount(flat, rows.ravel(), minlength=n + 1)[1:] / count,
                         np.bincount(flat, cols.ravel(), minlength=n + 1)[1:] / count], axis=1)


def _pieces(assigned: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """4-connected regions of equal non-zero value: (H, W) int32 labels 1..P numbered in raster order of their
    first pixel (as ``skimage.measure.label(assigned, background=0, connectivity=1)``), each region's area and
    value (P,) int64."""
    return _label_equal(np.ascontiguousarray(assigned))


@numba.njit(cache=True, nogil=True)
def _with_label(parent, n):
    """``parent`` with provisional label ``n`` as its own root (grown by doubling when full)."""
    if n >= len(parent):
        grown = np.zeros(2 * len(parent), np.int32)
        grown[: len(parent)] = parent
        parent = grown
    parent[n] = n
    return parent


@numba.njit(cache=True, nogil=True)
def _number_roots(parent, n):
    """Final ids of provisional labels 1..n: roots numbered 1, 2, ... in label order, others their root's id
    (a root is the smallest label of its set, so it is numbered before the rest); and how many there are."""
    final = np.zeros(n + 1, np.int32)
    count = 0
    for k in range(1, n + 1):
        root = _find(parent, k)
        if root == k:
            count += 1
            final[k] = count
        else:
            final[k] = final[root]
    return final, count


@numba.njit(cache=True, nogil=True)
def _find(parent, a):
    while parent[a] != a:
        parent[a] = parent[parent[a]]
        a = parent[a]
    return a


@numba.njit(cache=True, nogil=True)
def _label_equal(assigned):
    """Two-pass union-find labelling; a region's first pixel in raster order makes its smallest provisional
    label, which stays its root (unions keep the smaller root), so numbering roots in order gives raster order."""
    h, w = assigned.shape
    lab = np.zeros((h, w), np.int32)
    parent = np.zeros(1024, np.int32)
    n = 0
    for i in range(h):
        for j in range(w):
            v = assigned[i, j]
            if v == 0:
                continue
            up = lab[i - 1, j] if i > 0 and assigned[i - 1, j] == v else 0
            left = lab[i, j - 1] if j > 0 and assigned[i, j - 1] == v else 0
            if up == 0 and left == 0:
                n += 1
                parent = _with_label(parent, n)
                lab[i, j] = n
            elif up == 0 or left == 0 or up == left:
                lab[i, j] = max(up, left)
            else:
                a, b = _find(parent, up), _find(parent, left)
                if a < b:
                    parent[b] = a
                elif b < a:
                    parent[a] = b
                lab[i, j] = min(a, b)
    final, count = _number_roots(parent, n)
    area = np.zeros(count, np.int64)
    value = np.zeros(count, np.int64)
    for i in range(h):
        for j in range(w):
            k = lab[i, j]
            if k:
                f = final[k]
                lab[i, j] = f
                area[f - 1] += 1
                value[f - 1] = assigned[i, j]
    return lab, area, value
