"""Each nucleus's class from the type head and the nucleus's own look: a small logistic regression.

A typed model's type head gives each pixel class probabilities; by default a nucleus takes the arg-max of their
mean over its pixels. ``train`` can also fit a multinomial logistic regression on each clicked nucleus's log
mean class probabilities plus its shape and stain (inside the nucleus and in a ring of ``RING_UM`` around it) and
its neighbourhood (the mean class probabilities of the nuclei within ``NEIGHBOUR_UM``), and keeps it only when it
beats the head on the held-back clicks (CoNSeP: the head never predicts the rare "Other" class; its outline and
colour do). It is stored as plain numbers in ``thresholds.json`` (no pickle) and applied by
:func:`pronet_wsi.postprocess.postprocess`. The features depend only on a nucleus's pixels, its ring and the nuclei
within ``NEIGHBOUR_UM``, so a nucleus gets the same features in any tile that holds it with that much around it
(``segment``'s halo is the model's context, 40 um for the shipped model).
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from pronet_wsi.errors import InputError
from pronet_wsi.measurements import STAIN_TABLES, stain_amount

#: Ring around each nucleus whose colour is measured (its cytoplasm or the stroma it lies in), um.
RING_UM = 2.0
#: Neighbours whose mean class probabilities are features, um between centroids. Validation mean class F1 of four
#: typed runs (CoNSeP / CRCHisto, all clicks / ten images) against the look alone: +0.028 / +0.041 / +0.009 /
#: +0.011 (15 um: +0.021 / +0.021 / +0.002 / -0.003; 40 um: +0.020 / +0.039 / +0.026 / +0.017, beyond small halos).
NEIGHBOUR_UM = 25.0
_CHANNELS = ("R", "G", "B", "Hematoxylin OD", "Eosin OD")
#: The features before the K class log-probabilities, in order.
LOOK_FEATURES = ("area um2", "major axis um", "minor axis um", "eccentricity") + tuple(
    f"{where} {ch} {stat}" for where in ("nucleus", "ring") for ch in _CHANNELS for stat in ("mean", "std"))


def feature_names(classes: tuple[str, ...]) -> tuple[str, ...]:
    """The classifier's input columns for a model with ``classes``: the look, the nucleus's own log class
    probabilities, then its neighbours' (a classifier fitted before the neighbours existed has the columns up to
    its own and keeps working)."""
    return LOOK_FEATURES + tuple(f"log p({c})" for c in classes) + tuple(f"neighbours log p({c})" for c in classes)


def nucleus_features(image: np.ndarray, labels: np.ndarray, type_probs: np.ndarray, mpp: float) -> np.ndarray:
    """(N, F) float64 features of instances 1..N of ``labels`` (the columns of :func:`feature_names`).

    image : (H, W, 3) uint8 the labels were segmented from; labels : (H, W) ids 1..N; type_probs : (N, K) mean
    class probabilities (before any class weights); mpp : um per pixel of ``labels``. A nucleus's neighbours are
    the others whose centroid lies within :data:`NEIGHBOUR_UM` of its own; with none, their mean is uniform.
    """
    from pronet_wsi.cells import expand_labels

    n = len(type_probs)
    if n == 0:
        return np.zeros((0, len(LOOK_FEATURES) + 2 * type_probs.shape[1]))
    if image.shape[:2] != labels.shape:
        raise ValueError(f"image {image.shape[:2]} and labels {labels.shape} differ in shape")
    lab = np.asarray(labels, np.int64)
    grown = expand_labels(lab, max(1, round(RING_UM / mpp)))
    # per nucleus, inside it (0) and in its ring (1): pixel counts, sums of R, G, B, H, E and of the row and column
    # (first pass), then sums of squared deviations (second pass), in raster order as np.bincount sums them
    image = np.ascontiguousarray(image, np.uint8)
    od, inv = STAIN_TABLES
    counts, sums, devs = _look_moments(lab, grown, image, od, inv, n)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts[:, None, :]  # (2, 7, n + 1): R, G, B, H, E, row, col
    cnt = counts[0, 1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        # second central moments (+1/12: a pixel is a unit square, as skimage's regionprops)
        srr = devs[0, 5, 1:] / cnt + 1 / 12
        scc = devs[0, 6, 1:] / cnt + 1 / 12
        src = devs[0, 7, 1:] / cnt
        half = np.sqrt(((srr - scc) / 2) ** 2 + src**2)
        l1, l2 = (srr + scc) / 2 + half, np.maximum((srr + scc) / 2 - half, 0)
        ecc = np.sqrt(np.maximum(1 - l2 / l1, 0))
        cols_out = [cnt * mpp**2, 4 * np.sqrt(l1) * mpp, 4 * np.sqrt(l2) * mpp, ecc]
        for where in (0, 1):
            for ch in range(5):
                cols_out += [means[where, ch, 1:], np.sqrt(devs[where, ch, 1:] / counts[where, 1:])]
    mr, mc = means[0, 5, 1:], means[0, 6, 1:]
    look = np.nan_to_num(np.stack(cols_out, axis=1))  # a nucleus without ring pixels: 0
    probs = np.asarray(type_probs, np.float64)
    near = neighbour_mean(np.stack([np.nan_to_num(mr), np.nan_to_num(mc)], axis=1), probs, NEIGHBOUR_UM / mpp)
    return np.concatenate([look, np.log(np.clip(probs, 1e-4, 1.0)), np.log(np.clip(near, 1e-4, 1.0))], axis=1)


@numba.njit(cache=True, nogil=True, inline="always")
def _look_values(image: np.ndarray, od: np.ndarray, inv: np.ndarray, r: int, c: int, out: np.ndarray) -> None:
    """R, G, B, hematoxylin and eosin OD (:func:`~pronet_wsi.measurements.stain_od`'s float32, bit for bit) of
    pixel (r, c), and its row and column, into ``out[:7]``."""
    red, green, blue = image[r, c, 0], image[r, c, 1], image[r, c, 2]
    out[0], out[1], out[2] = red, green, blue
    out[3] = stain_amount(od, inv[:, 0], red, green, blue)
    out[4] = stain_amount(od, inv[:, 1], red, green, blue)
    out[5], out[6] = r, c


@numba.njit(cache=True, nogil=True)
def _look_moments(lab: np.ndarray, grown: np.ndarray, image: np.ndarray, od: np.ndarray, inv: np.ndarray,
                  n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per label 0..n, inside the nuclei (0) and in their rings (1, labelled in ``grown`` only): (2, n + 1) pixel
    counts, (2, 7, n + 1) sums of :func:`_look_values` (first pass) and (2, 8, n + 1) sums of their squared
    deviations from the means, row 7 the row deviation times the column deviation (second pass); raster order."""
    counts = np.zeros((2, n + 1))
    sums = np.zeros((2, 7, n + 1))
    means = np.zeros((2, 7, n + 1))  # 0 where a label has no pixels (np.nan_to_num of 0 / 0)
    devs = np.zeros((2, 8, n + 1))
    v = np.empty(7)
    h, w = grown.shape
    for second in (False, True):
        if second:
            for where in range(2):
                for k in range(n + 1):
                    if counts[where, k] > 0:
                        means[where, :, k] = sums[where, :, k] / counts[where, k]
        for r in range(h):
            for c in range(w):
                k = grown[r, c]
                if k <= 0 or k > n:
                    continue
                where = 0 if lab[r, c] > 0 else 1
                _look_values(image, od, inv, r, c, v)
                if not second:
                    counts[where, k] += 1.0
                    sums[where, :, k] += v
                    continue
                for ch in range(7):
                    d = v[ch] - means[where, ch, k]
                    devs[where, ch, k] += d * d
                devs[where, 7, k] += (v[5] - means[where, 5, k]) * (v[6] - means[where, 6, k])
    return counts, sums, devs


def neighbour_mean(points: np.ndarray, values: np.ndarray, radius: float) -> np.ndarray:
    """(N, K) mean of ``values`` (N, K) over each point's neighbours (the other ``points`` (N, 2) within
    ``radius``); a point without neighbours gets the uniform 1 / K."""
    from scipy.spatial import cKDTree

    n, k = values.shape
    out = np.full((n, k), 1.0 / max(k, 1))
    if n < 2:
        return out
    pairs = cKDTree(points).query_pairs(radius, output_type="ndarray")
    if len(pairs) == 0:
        return out
    i = np.concatenate([pairs[:, 0], pairs[:, 1]])
    j = np.concatenate([pairs[:, 1], pairs[:, 0]])
    count = np.bincount(i, minlength=n).astype(np.float64)
    total = np.stack([np.bincount(i, weights=values[j, c], minlength=n) for c in range(k)], axis=1)
    has = count > 0
    out[has] = total[has] / count[has, None]
    return out


@dataclass(frozen=True)
class NucleusClassifier:
    """A multinomial logistic regression on :func:`nucleus_features` (standardised), as plain numbers.

    features : the column names (:func:`feature_names` of the model's classes); mpp : um per pixel the features
    are measured at (the model's); mean, scale : standardisation; coef : (K, F); intercept : (K,).
    """

    features: tuple[str, ...]
    mpp: float
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[tuple[float, ...], ...]
    intercept: tuple[float, ...]

    def __post_init__(self) -> None:
        f = len(self.features)
        object.__setattr__(self, "features", tuple(str(x) for x in self.features))
        for name in ("mean", "scale", "intercept"):
            object.__setattr__(self, name, tuple(float(x) for x in getattr(self, name)))
        object.__setattr__(self, "coef", tuple(tuple(float(x) for x in row) for row in self.coef))
        if len(self.mean) != f or len(self.scale) != f or any(len(r) != f for r in self.coef) \
                or len(self.intercept) != len(self.coef) or not self.coef:
            raise InputError(f"nucleus_classifier: {f} features but mean {len(self.mean)}, scale {len(self.scale)}, "
                             f"coef {len(self.coef)} x {len(self.coef[0]) if self.coef else 0}, intercept "
                             f"{len(self.intercept)}")
        if not self.mpp > 0 or not all(np.isfinite(self.scale)) or min(self.scale) <= 0:
            raise InputError("nucleus_classifier: mpp and scale must be numbers > 0")

    @classmethod
    def from_json(cls, raw: dict) -> NucleusClassifier:
        """From its ``thresholds.json`` form (a dict of lists)."""
        try:
            return cls(**raw)
        except TypeError as exc:
            raise InputError(f"nucleus_classifier: {exc}") from exc

    @property
    def reach_um(self) -> float:
        """How far from a nucleus's centroid other nuclei change its features (0: its pixels and ring only)."""
        return NEIGHBOUR_UM if any(f.startswith("neighbours ") for f in self.features) else 0.0

    def check_classes(self, classes: tuple[str, ...]) -> None:
        """InputError unless the classifier was fitted for a model with ``classes``."""
        names = feature_names(classes)
        if self.features not in (names, names[:len(LOOK_FEATURES) + len(classes)]):  # the latter: before neighbours
            raise InputError(f"nucleus_classifier: fitted for other features or classes than the model's "
                             f"{', '.join(classes)}")

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """(N, K) float32 class probabilities of the (N, F) feature rows ``x``."""
        z = (np.asarray(x, np.float64) - np.asarray(self.mean)) / np.asarray(self.scale)
        logits = z @ np.asarray(self.coef).T + np.asarray(self.intercept)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def classify(image: np.ndarray, labels: np.ndarray, type_probs: np.ndarray,
             classifier: NucleusClassifier) -> np.ndarray:
    """(N, K) class probabilities of instances 1..N from the classifier (replacing the head's mean)."""
    if len(type_probs) == 0:
        return np.asarray(type_probs, np.float32)
    x = nucleus_features(image, labels, type_probs, classifier.mpp)
    return classifier.predict_proba(x[:, :len(classifier.features)])  # a classifier from before the neighbours


def fit_classifier(x: np.ndarray, y: np.ndarray, classes: tuple[str, ...], mpp: float, c: float = 1.0,
                   names: tuple[str, ...] | None = None) -> NucleusClassifier:
    """A class-weighted multinomial logistic regression of class indices ``y`` (N,) on features ``x`` (N, F) named
    ``names`` (default: :func:`feature_names` of ``classes``, the columns of :func:`nucleus_features`).

    Each class weighs sqrt(N / (K * its examples)) in the loss, half-way to balanced: a rare class can win
    without taking over (CoNSeP held-back clicks, mean class F1: 0.551 unweighted, 0.562 balanced, 0.591 this).
    A class without examples gets a logit that never wins.
    """
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(x, np.float64)
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    present = np.unique(y)
    k, f = len(classes), x.shape[1]
    coef, intercept = np.zeros((k, f)), np.full(k, -30.0)
    if len(present) == 1:
        intercept[present[0]] = 0.0
    else:
        counts = {int(k): int((y == k).sum()) for k in present}
        weight = {k: (len(y) / (len(present) * n)) ** 0.5 for k, n in counts.items()}
        lr = LogisticRegression(C=c, class_weight=weight, max_iter=3000).fit((x - mean) / scale, y)
        if len(present) == 2:  # sklearn's binary form: one row for the second class
            coef[present[1]], intercept[present[1]] = lr.coef_[0], lr.intercept_[0]
            intercept[present[0]] = 0.0
        else:
            coef[lr.classes_], intercept[lr.classes_] = lr.coef_, lr.intercept_
    return NucleusClassifier(feature_names(classes) if names is None else names, mpp, tuple(mean), tuple(scale),
                             tuple(map(tuple, coef)), tuple(intercept))
