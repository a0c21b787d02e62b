"""Where should a pathologist click? Boxes of a slide where the model is least reliable, for QuPath.

Candidate boxes are spread over the tissue; each is read at the model's resolution and run twice, as it is and
mirrored. A box scores high when the two views disagree on the foreground (``flip disagreement``) and when much
of its foreground is neither clearly nucleus nor clearly background (``uncertain foreground``); both are
measured without labels. The picks rotate over tissue types (k-means on the boxes' mean colour) and keep apart,
so the clicks teach the model something new everywhere. Inside each box the model's nuclei centres are written
as one Points annotation: correcting them (move, delete, add) is faster than clicking from scratch.

With a typed model a box also scores by ``type uncertainty`` (how far its nuclei's class probabilities are
from certain), and its nuclei are written as one Points annotation per predicted class, classified and coloured
as the model's classes, so correcting a type is moving a point to the right class's annotation.

Pure functions on maps and boxes; :func:`pronet_wsi.wsi.pipeline.suggest_slide` reads the slide and runs the model.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pronet_wsi.errors import InputError
from pronet_wsi.files import atomic_bytes, mark_owned
from pronet_wsi.geometry import Box, rc_to_xy
from pronet_wsi.postprocess import PostprocessConfig, postprocess

REGION_CLASS = {"name": "Click here", "color": [250, 200, 0]}
POINTS_CLASS = {"name": "Nucleus", "color": [220, 50, 50]}
_NS = uuid.UUID("2b0a3c55-8f43-4d0e-9a59-0f6d2c2b7e11")


@dataclass(frozen=True)
class SuggestConfig:
    """regions : boxes to propose. region_um : their side in um. candidates : boxes scored per slide.
    groups : tissue types the picks rotate over. min_gap : least distance between picks, in box sides."""

    regions: int = 20
    region_um: float = 100.0
    candidates: int = 160
    groups: int = 4
    min_gap: float = 1.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.regions < 1 or self.candidates < self.regions:
            raise InputError(f"regions={self.regions}, candidates={self.candidates}: need 1 <= regions <= "
                             "candidates")
        if not 10 <= self.region_um <= 2000:
            raise InputError(f"region_um={self.region_um}: must be between 10 and 2000 um")


def box_unreliability(plain: dict[str, np.ndarray], mirrored: dict[str, np.ndarray]) -> dict[str, float]:
    """Label-free unreliability of one box from its maps and the maps of its mirror image (mirrored back).

    ``flip_disagreement``: mean |p - p'| of the foreground probability where either view sees foreground;
    ``uncertain``: fraction of that area with 0.3 < p < 0.7; ``score`` = their sum (0 = sure and consistent).
    """
    p, q = plain["foreground"], mirrored["foreground"]
    area = (p > 0.3) | (q > 0.3)
    if not area.any():
        return {"flip_disagreement": 0.0, "uncertain": 0.0, "score": 0.0}
    dis = float(np.abs(p - q)[area].mean())
    unc = float(((p > 0.3) & (p < 0.7))[area].mean())
    return {"flip_disagreement": dis, "uncertain": unc, "score": dis + unc}


def type_uncertainty(type_probs: np.ndarray) -> float:
    """Mean over a box's nuclei of ``1 - p_max`` scaled to [0, 1] (0: every nucleus sure of its class, 1: every
    one uniform over the K classes). ``type_probs`` : (N, K) mean class probabilities; no nuclei gives 0."""
    if type_probs.size == 0:
        return 0.0
    k = type_probs.shape[1]
    return float(((1.0 - type_probs.max(axis=1)) / (1.0 - 1.0 / k)).mean()) if k > 1 else 0.0


def candidate_centres(mask: np.ndarray, downsample: float, n: int) -> np.ndarray:
    """About ``n`` level-0 (x, y) points spread evenly over the tissue of ``mask`` (a thumbnail mask)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return np.zeros((0, 2))
    step = max(1.0, float(np.sqrt(len(xs) / n)))
    cells: dict[tuple[int, int], list[int]] = {}
    for i, key in enumerate(zip((ys // step).astype(int).tolist(), (xs // step).astype(int).tolist(), strict=True)):
        cells.setdefault(key, []).append(i)
    centres = []
    for idx in cells.values():  # the tissue pixel nearest each grid cell's tissue mean
        cy, cx = ys[idx].mean(), xs[idx].mean()
        j = idx[int(np.argmin((ys[idx] - cy) ** 2 + (xs[idx] - cx) ** 2))]
        centres.append(((xs[j] + 0.5) * downsample, (ys[j] + 0.5) * downsample))
    return np.array(centres, np.float64)


def choose_boxes(scores: np.ndarray, centres_xy: np.ndarray, groups: np.ndarray, n: int, min_dist: float
                 ) -> list[int]:
    """Indices of up to ``n`` boxes: highest score first, rotating over ``groups``, at least ``min_dist`` apart."""
    order = {g: [int(i) for i in np.argsort(-scores, kind="stable") if groups[i] == g] for g in np.unique(groups)}
    ranked_groups = sorted(order, key=lambda g: -scores[order[g][0]])
    chosen: list[int] = []
    while len(chosen) < n and any(order.values()):
        for g in ranked_groups:
            while order[g]:
                i = order[g].pop(0)
                if all(np.hypot(*(centres_xy[i] - centres_xy[j])) >= min_dist for j in chosen):
                    chosen.append(i)
                    break
            if len(chosen) == n:
                break
    return chosen


def _colour_groups(colours: np.ndarray, k: int, seed: int) -> np.ndarray:
    k = min(k, len(colours))
    if k <= 1:
        return np.zeros(len(colours), int)
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(colours)


def score_box(plain: dict[str, np.ndarray], mirrored_back: dict[str, np.ndarray],
              postprocess_config: PostprocessConfig, image: np.ndarray | None = None) -> dict[str, float]:
    """:func:`box_unreliability`, plus ``type_uncertain`` (added to ``score``) when the maps carry ``types``
    (``image``: the box's pixels, for a model with a nucleus classifier)."""
    score = box_unreliability(plain, mirrored_back)
    if "types" in plain:
        tp = postprocess(plain, postprocess_config, image).type_probs
        score["type_uncertain"] = type_uncertainty(tp if tp is not None else np.zeros((0, 1)))
        score["score"] += score["type_uncertain"]
    return score


def suggestions(stem: str, boxes: list[Box], scores: list[dict], colours: np.ndarray, maps: list[dict],
                side_px: int, config: SuggestConfig, postprocess_config: PostprocessConfig,
                classes: tuple[str, ...] = (), class_colors=(),
                images: list[np.ndarray] | None = None) -> tuple[list[dict], dict]:
    """The picked boxes as QuPath annotations, each with its model nuclei as Points; and a summary.

    boxes : level-0 candidate boxes; scores, colours (N, 3) mean RGB, maps : each box's (unmirrored) maps,
    read at ``side_px`` model px; images : each box's pixels (for a model with a nucleus classifier).
    """
    if not boxes:
        return [], {"regions": 0, "candidates": 0}
    side0 = boxes[0].width
    centres = np.array([((b.x0 + b.x1) / 2, (b.y0 + b.y1) / 2) for b in boxes])
    total = np.array([s["score"] for s in scores])
    groups = _colour_groups(np.asarray(colours), config.groups, config.seed)
    picks = choose_boxes(total, centres, groups, config.regions, config.min_gap * side0)
    features = []
    for rank, i in enumerate(picks, start=1):
        b, s = boxes[i], scores[i]
        seg = postprocess(maps[i], postprocess_config, None if images is None else images[i])
        pts = rc_to_xy(seg.centers_rc) * (side0 / side_px) + [b.x0, b.y0]  # level-0 continuous, as QuPath reads
        worst = max(("flip_disagreement", "uncertain", "type_uncertain"), key=lambda k: s.get(k, -1.0))
        reason = {"flip_disagreement": "the mirrored view disagrees", "uncertain": "foreground is uncertain",
                  "type_uncertain": "nucleus types are uncertain"}[worst]
        features.append(_rectangle(f"{stem}/{rank}", b, rank, reason, s, int(groups[i])))
        if classes and len(pts):  # one classified Points annotation per predicted class
            for c, name in enumerate(classes):
                sel = seg.class_index == c
                if sel.any():
                    cls = {"name": name, "color": list(class_colors[c])}
                    features.append(_points(f"{stem}/{rank}/points/{name}", pts[sel], rank, cls))
        elif len(pts):
            features.append(_points(f"{stem}/{rank}/points", pts, rank))
    return features, {"regions": len(picks), "candidates": len(boxes),
                      "mean_score_chosen": float(total[picks].mean()) if picks else 0.0,
                      "mean_score_all": float(total.mean())}


def _rectangle(key: str, b, rank: int, reason: str, s: dict, group: int) -> dict:
    ring = [[round(x, 2), round(y, 2)] for x, y in ((b.x0, b.y0), (b.x1, b.y0), (b.x1, b.y1), (b.x0, b.y1),
                                                    (b.x0, b.y0))]
    return {"type": "Feature", "id": str(uuid.uuid5(_NS, key)), "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"objectType": "annotation", "name": f"#{rank}: {reason}", "classification": REGION_CLASS,
                           "isLocked": False,
                           "measurements": {"Rank": rank, "Unreliability": round(s["score"], 4),
                                            "Flip disagreement": round(s["flip_disagreement"], 4),
                                            "Uncertain foreground": round(s["uncertain"], 4),
                                            **({"Type uncertainty": round(s["type_uncertain"], 4)}
                                               if "type_uncertain" in s else {}),
                                            "Tissue type": group}}}


def _points(key: str, pts: np.ndarray, rank: int, classification: dict | None = None) -> dict:
    name = f"#{rank}: model nuclei (correct me)" if classification is None else \
        f"#{rank}: model's {classification['name']} nuclei (correct me)"
    return {"type": "Feature", "id": str(uuid.uuid5(_NS, key)),
            "geometry": {"type": "MultiPoint", "coordinates": [[round(float(x), 2), round(float(y), 2)]
                                                               for x, y in pts]},
            "properties": {"objectType": "annotation", "name": name,
                           "classification": classification or POINTS_CLASS, "isLocked": False}}


def write_suggestions(path: str | Path, features: list[dict]) -> None:
    """One QuPath FeatureCollection, written atomically."""
    text = json.dumps({"type": "FeatureCollection", "features": features}, ensure_ascii=False)
    atomic_bytes(Path(path), (text + "\n").encode())
    mark_owned(Path(path))
