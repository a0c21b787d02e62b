"""Nucleus types (issue 21): data preparation, today's QuPath-style baseline, and scoring a typed model.

    python -m benchmarks.types prepare --out runs/types
    python -m benchmarks.types baseline --data runs/types --set consep      # and --set crchisto
    python -m benchmarks.types score --data runs/types --set consep --model runs/typed-consep
    python -m benchmarks.types reweight --set consep --model runs/typed-consep --out runs/typed-consep-w [--classifier]

**prepare** writes, for each set, ``OUT/<set>/<split>/images/<stem>.<ext>`` (symlinks to ../shared/data),
``points/<stem>.csv`` (``x,y,class``, continuous level-0 frame: pixel ``[r, c]`` has centre ``(c+0.5, r+0.5)``;
an empty class = a nucleus without a type) and ``mpp.txt``; splits ``train``, ``val``, ``test`` and ``train10``
(10 training images drawn by a seed-0 permutation; for CoNSeP one 256x256 crop from each of 10 different tiles).

- **consep**: instance centroids with CoNSeP's 7 types merged to HoVer-Net's 4: Other (1), Inflammatory (2),
  Epithelial (3 healthy, 4 malignant), Spindle (5 fibroblast, 6 muscle, 7 endothelial); the shared copy holds
  ids 1-4 only, already merged (1 Other, 2 Inflammatory, 3 Epithelial, 4 Spindle; see CONSEP_MERGED), and
  prepare uses whichever mapping the ids present call for. test = test/, val =
  training tiles 24-27 (labs.CONSEP_VAL_TILES), train = the other training tiles; crops of one tile stay together.
  0.25 um/px. ``labels/`` symlinks the instance maps too (for validation scores).
- **crchisto**: the dots of points_xy.csv (0-based pixel index + 0.5) with classes Epithelial / Inflammatory /
  Fibroblast / Others, plus the 7,312 dots of ``labels/imgN_detection.mat`` that have no class, written with an
  empty class (they count for detection only; without them every prediction on an unclassified nucleus would be a
  false positive). Split: split_sfcn-opi.txt (train / validation -> val / test). Pixel size: assumed 0.5 um/px
  (20x); no outlines, so no nucleus-size check; ``prepare`` prints the nearest-neighbour spacing of the dots next
  to CoNSeP's as a rough check only. Dots lying within 0.5 px of the image border are clipped into it.

**baseline** is what a QuPath user does today: the shipped untyped model segments every train and test image;
each nucleus gets measurements (area, perimeter, eccentricity, solidity, mean/std RGB, hematoxylin and eosin OD
mean/std inside the nucleus and in a ring of about 2 um around it, nuclei within 25 um); a training nucleus takes
the class of the training click inside it (nuclei with no click, or clicks of two classes, are not used); a seeded
HistGradientBoostingClassifier classifies every test nucleus; the nucleus centroids with those classes are scored
against the test clicks (pronet_wsi.detection, radius 3 um, counts pooled over images). Trained on the full train
split and on train10; a "majority" row (every nucleus the most frequent training class) is printed for context.
Segmentations are cached under ``DATA/<set>/<split>/seg_shipped/``.

**score** runs a typed model (``Predictor(model).classes``; ``segment_image`` giving ``class_index``) on the test
images and scores the same way.

**reweight** ends a model trained before as ``train`` ends a typed run now (class weights on the held-back clicks;
with ``--classifier`` also the nucleus classifier, ``pronet_wsi.training.loop.fit_types``) and writes the result
to a new model folder.

Rows go to benchmarks/results/types_baseline.csv and types_scores.csv (one row per class, plus ``mean`` and
``detection``), each with the commit, seed and machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from benchmarks import labs
from benchmarks.record import banner, smoke_skip

RESULTS = labs.ROOT / "benchmarks" / "results"
SEED = 0
RADIUS_UM = 3.0
RING_UM = 2.0
DENSITY_UM = 25.0
CONSEP_CLASSES = ("Other", "Inflammatory", "Epithelial", "Spindle")
CONSEP_MERGE = {1: "Other", 2: "Inflammatory", 3: "Epithelial", 4: "Epithelial", 5: "Spindle", 6: "Spindle",
                7: "Spindle"}
# The shared copy's inst_types.json holds only ids 1-4 although its README lists CoNSeP's 7: it is HoVer-Net's
# merged typing (type 4 nuclei are small and elongated, median 170 px and eccentricity 0.84, against 286 px and
# 0.81 for type 3: spindle cells, not malignant epithelium). prepare picks the mapping from the ids present.
CONSEP_MERGED = {1: "Other", 2: "Inflammatory", 3: "Epithelial", 4: "Spindle"}
CRCHISTO_CLASSES = ("Epithelial", "Inflammatory", "Fibroblast", "Others")
SETS = {"consep": CONSEP_CLASSES, "crchisto": CRCHISTO_CLASSES}
CRCHISTO_MPP = 0.5  # 20x, assumed (see the module docstring)
DUPLICATE_PX = 10.0  # a class dot this close to a detection dot marks the same nucleus (CRCHisto; see prepare)


# --- prepare ---


def _write_points(path: Path, points_xy: np.ndarray, classes: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["x", "y", "class"])
        writer.writerows([repr(float(x)), repr(float(y)), c] for (x, y), c in zip(points_xy, classes, strict=True))


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target.resolve())


def _train10(stems: list[str], group_of) -> list[str]:
    """10 stems by a seed-0 permutation, at most one per group (tile)."""
    order = np.random.default_rng(SEED).permutation(len(stems))
    chosen: list[str] = []
    seen: set[str] = set()
    for i in order:
        g = group_of(stems[i])
        if g not in seen:
            seen.add(g)
            chosen.append(stems[i])
        if len(chosen) == 10:
            break
    return sorted(chosen)


def _nn_spacing(points: list[np.ndarray]) -> float:
    from scipy.spatial import cKDTree

    d = [cKDTree(p).query(p, k=2)[0][:, 1] for p in points if len(p) > 1]
    return float(np.median(np.concatenate(d)))


def prepare_consep(out: Path) -> list[np.ndarray]:
    from pronet_wsi.images import read_labels
    from pronet_wsi.training.points import centroids_from_labels

    root = labs.DATA / "consep"
    ids_seen = {v for part in ("train", "test")
                for vs in json.loads((root / part / "inst_types.json").read_text()).values() for v in vs}
    merge = CONSEP_MERGE if max(ids_seen) > 4 else CONSEP_MERGED
    print(f"consep: type ids {sorted(ids_seen)} -> "
          f"{'7 CoNSeP types merged' if merge is CONSEP_MERGE else 'already HoVer-Net 4 classes'}: {merge}")
    written: dict[str, list[str]] = {}
    files: dict[str, tuple[Path, Path, np.ndarray, list[str]]] = {}
    all_pts = []
    for part in ("train", "test"):
        types = json.loads((root / part / "inst_types.json").read_text())
        for img in sorted((root / part / "images").glob("*.jpg")):
            stem = img.stem
            split = labs._split_of("consep", stem)
            labels = read_labels(root / part / "labels" / f"{stem}.png")
            pts, ids = centroids_from_labels(labels)
            t = types[stem]
            if len(ids) and ids.max() > len(t):
                raise SystemExit(f"{stem}: label id {ids.max()} but {len(t)} types in inst_types.json")
            classes = [merge[int(t[i - 1])] for i in ids]
            files[stem] = (img, root / part / "labels" / f"{stem}.png", pts, classes)
            written.setdefault(split, []).append(stem)
            all_pts.append(pts * labs.LABS["consep"].mpp)
    written["train10"] = _train10(written["train"], lambda stem: stem.split("_")[1])  # one crop per tile
    for split, stems in written.items():
        for stem in stems:
            img, lab, pts, classes = files[stem]
            _link(img, out / split / "images" / img.name)
            _link(lab, out / split / "labels" / lab.name)
            _write_points(out / split / "points" / f"{stem}.csv", pts, classes)
    for split in ("train", "val", "test", "train10"):
        (out / split / "mpp.txt").write_text(f"{labs.LABS['consep'].mpp}\n")
    _print_prepared("consep", out, written)
    return all_pts


def prepare_crchisto(out: Path) -> list[np.ndarray]:
    import scipy.io as sio

    from pronet_wsi.detection import match_points

    root = labs.DATA / "crchisto"
    split_of = {}
    for line in (root / "split_sfcn-opi.txt").read_text().split("\n"):
        if line.strip():
            name, split = line.split()
            split_of[name] = {"validation": "val"}.get(split, split)
    typed: dict[str, list[tuple[float, float, str]]] = {}
    with open(root / "points_xy.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            stem = row["image"].rsplit(".", 1)[0]
            name = row["class_name"]
            typed.setdefault(stem, []).append((float(row["x_col_0based"]) + 0.5, float(row["y_row_0based"]) + 0.5,
                                               name[:1].upper() + name[1:]))
    written: dict[str, list[str]] = {}
    n_untyped = n_clipped = 0
    all_pts = []
    for stem in sorted(split_of, key=lambda s: int(s[3:])):
        img = root / "images" / f"{stem}.png"
        rows = typed.get(stem, [])
        pts = np.array([(x, y) for x, y, _ in rows], np.float64).reshape(-1, 2)
        classes = [c for _, _, c in rows]
        det = sio.loadmat(root / "labels" / f"{stem}_detection.mat")["detection"].astype(np.float64).reshape(-1, 2)
        det = det - 0.5  # 1-based MATLAB pixel (centre at 1.0) -> continuous frame (centre at 0.5)
        # the class dots are the detection dots rounded to 3 decimals, except 82 that lie 1-9.5 px from the
        # nearest detection dot: pair them one-to-one within DUPLICATE_PX so no nucleus is written twice (leaves
        # 7,313 dots without a class; the README counts 29,756 - 22,444 = 7,312)
        paired = match_points(det, pts, DUPLICATE_PX)[:, 0]
        extra = np.delete(det, paired, axis=0)
        n_untyped += len(extra)
        pts = np.concatenate([pts, extra])
        classes += [""] * len(extra)
        from PIL import Image

        with Image.open(img) as im:
            w, h = im.size
        clipped = np.clip(pts, 0.5, [w - 0.5, h - 0.5])
        n_clipped += int((np.abs(clipped - pts) > 1e-9).any(axis=1).sum())
        split = split_of[stem]
        _link(img, out / split / "images" / img.name)
        _write_points(out / split / "points" / f"{stem}.csv", clipped, classes)
        written.setdefault(split, []).append(stem)
        all_pts.append(clipped * CRCHISTO_MPP)
    for stem in _train10(written["train"], lambda s: s):
        _link(root / "images" / f"{stem}.png", out / "train10" / "images" / f"{stem}.png")
        dst = out / "train10" / "points" / f"{stem}.csv"
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text((out / "train" / "points" / f"{stem}.csv").read_text())
        written.setdefault("train10", []).append(stem)
    for split in ("train", "val", "test", "train10"):
        (out / split / "mpp.txt").write_text(f"{CRCHISTO_MPP}\n")
    print(f"crchisto: {n_untyped} dots without a class added with an empty class; {n_clipped} dots clipped into "
          "the image (pixel-centre range)")
    _print_prepared("crchisto", out, written)
    return all_pts


def _print_prepared(name: str, out: Path, written: dict[str, list[str]]) -> None:
    from pronet_wsi.training.points import read_points_classes

    print(f"\n{name} -> {out}")
    print(f"{'split':<8} {'images':>6} {'points':>7}  classes")
    for split in ("train", "val", "test", "train10"):
        counter: Counter = Counter()
        for stem in written[split]:
            counter.update(read_points_classes(out / split / "points" / f"{stem}.csv")[1])
        text = ", ".join(f"{c or '(none)'} {n}" for c, n in sorted(counter.items()))
        print(f"{split:<8} {len(written[split]):>6} {sum(counter.values()):>7}  {text}")


def cmd_prepare(args: argparse.Namespace) -> None:
    out = Path(args.out)
    consep_pts = prepare_consep(out / "consep")
    crc_pts = prepare_crchisto(out / "crchisto")
    print(f"\npixel-size check (rough): median nearest-neighbour spacing of the points: CoNSeP "
          f"{_nn_spacing(consep_pts):.2f} um at 0.25 um/px, CRCHisto {_nn_spacing(crc_pts):.2f} um at the assumed "
          f"{CRCHISTO_MPP} um/px. CRCHisto has no outlines, so no nucleus-size check: 0.5 um/px (20x) is assumed.")


# --- shared by baseline and score ---


def _split_files(data: Path, split: str) -> list[tuple[str, Path, Path]]:
    folder = data / split
    if not (folder / "images").is_dir():
        raise SystemExit(f"{folder}/images not found; run `python -m benchmarks.types prepare --out {data.parent}`")
    return [(p.stem, p, folder / "points" / f"{p.stem}.csv") for p in sorted((folder / "images").iterdir())]


def _mpp(data: Path, split: str) -> float:
    return float((data / split / "mpp.txt").read_text())


def _segment_cached(data: Path, split: str, predictor, tag: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """stem -> (RGB image, instance labels) from the shipped model, cached as TIFFs."""
    from pronet_wsi.images import read_image, read_labels, write_labels
    from pronet_wsi.inference import segment_image

    mpp = _mpp(data, split)
    out = {}
    cache = data / split / f"seg_{tag}"
    cache.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    n_new = 0
    for stem, img, _ in _split_files(data, split):
        rgb = read_image(img)
        path = cache / f"{stem}.tif"
        if path.exists():
            labels = read_labels(path)
        else:
            labels = segment_image(rgb, predictor, mpp=mpp).labels
            write_labels(path, labels)
            n_new += 1
        out[stem] = (rgb, labels)
    if n_new:
        print(f"  segmented {n_new} {split} images in {time.perf_counter() - t0:.0f} s")
    return out


def nucleus_features(rgb: np.ndarray, labels: np.ndarray, mpp: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-nucleus measurements -> (ids (N,), centroids_xy (N, 2) continuous px, features (N, F) float32)."""
    from scipy.spatial import cKDTree
    from skimage.color import rgb2hed
    from skimage.measure import regionprops_table
    from skimage.segmentation import expand_labels

    from pronet_wsi.training.points import centroids_from_labels

    xy, ids = centroids_from_labels(labels)
    if len(ids) == 0:
        return ids, xy, np.zeros((0, 0), np.float32)
    props = regionprops_table(labels.astype(np.int32), properties=("label", "area", "perimeter", "eccentricity",
                                                                    "solidity", "major_axis_length",
                                                                    "minor_axis_length"))
    order = np.searchsorted(props["label"], ids)
    shape = np.stack([props["area"][order] * mpp**2, props["perimeter"][order] * mpp, props["eccentricity"][order],
                      props["solidity"][order], props["major_axis_length"][order] * mpp,
                      props["minor_axis_length"][order] * mpp], axis=1)
    hed = rgb2hed(rgb)
    channels = [rgb[..., k].astype(np.float64) for k in range(3)] + [hed[..., 0], hed[..., 1]]
    ring = expand_labels(labels, distance=max(1, round(RING_UM / mpp)))
    ring[labels > 0] = 0
    cols = [shape]
    with np.errstate(invalid="ignore", divide="ignore"):  # a nucleus with no ring pixels: NaN, set to 0 below
        cols += _region_stats(channels, labels, ring, ids)
    tree = cKDTree(xy * mpp)
    density = np.array([len(n) - 1 for n in tree.query_ball_point(xy * mpp, DENSITY_UM)], np.float64)
    cols.append(density[:, None])
    feats = np.nan_to_num(np.concatenate(cols, axis=1)).astype(np.float32)
    return ids, xy, feats


def _region_stats(channels: list[np.ndarray], labels: np.ndarray, ring: np.ndarray, ids: np.ndarray) -> list:
    """(N, 2) mean and std of each channel inside each nucleus, then in its ring."""
    from scipy import ndimage as ndi

    cols = []
    for region in (labels, ring):
        for ch in channels:
            mean = np.asarray(ndi.mean(ch, region, ids))
            std = np.asarray(ndi.standard_deviation(ch, region, ids))
            cols.append(np.stack([mean, std], axis=1))
    return cols


def _click_classes(labels: np.ndarray, ids: np.ndarray, points_xy: np.ndarray, classes: list[str]) -> list[str]:
    """The class of the click inside each nucleus ("" for none, or for clicks of two classes)."""
    h, w = labels.shape
    got: dict[int, set[str]] = {}
    for (x, y), c in zip(points_xy, classes, strict=True):
        if not c:
            continue
        r, col = min(max(int(np.floor(y)), 0), h - 1), min(max(int(np.floor(x)), 0), w - 1)
        nid = int(labels[r, col])
        if nid:
            got.setdefault(nid, set()).add(c)
    return [next(iter(got[i])) if len(got.get(int(i), ())) == 1 else "" for i in ids]


def _score(pred: list[tuple[np.ndarray, list[str]]], gt: list[tuple[np.ndarray, list[str]]], radius_px: float,
           classes: tuple[str, ...]):
    from pronet_wsi.detection import pool_scores, score_typed

    return pool_scores(score_typed(g_xy, g_cls, p_xy, p_cls, radius_px, classes)
                       for (p_xy, p_cls), (g_xy, g_cls) in zip(pred, gt, strict=True))


def _report(title: str, s) -> None:
    names = s.classes
    width = max(12, *(len(n) for n in names))
    print(f"\n{title}")
    print(f"{'class':<{width}} {'n_gt':>6} {'tp':>6} {'fp':>6} {'fn':>6}  {'P':>6} {'R':>6} {'F1':>6}  {'F_c':>6}")
    for c in s.per_class:
        print(f"{c.name:<{width}} {c.n_gt:>6} {c.tp:>6} {c.fp:>6} {c.fn:>6}  {c.precision:6.3f} {c.recall:6.3f} "
              f"{c.f1:6.3f}  {c.f_c:6.3f}")
    print(f"{'mean':<{width}} {'':>6} {'':>6} {'':>6} {'':>6}  {'':>6} {'':>6} {s.mean_f1:6.3f}  {s.mean_f_c:6.3f}")
    print(f"{'detection':<{width}} {s.tp_d + s.fn_d:>6} {s.tp_d:>6} {s.fp_d:>6} {s.fn_d:>6}  {s.precision_d:6.3f} "
          f"{s.recall_d:6.3f} {s.f_d:6.3f}  (F_d)   type accuracy {s.type_accuracy:.3f}")


def _rows(base: dict, s) -> list[dict]:
    rows = []
    for c in s.per_class:
        rows.append({**base, "class": c.name, "n_gt": c.n_gt, "n_pred": c.n_pred, "tp": c.tp, "fp": c.fp,
                     "fn": c.fn, "precision": f"{c.precision:.4f}", "recall": f"{c.recall:.4f}", "f1": f"{c.f1:.4f}",
                     "f_c": f"{c.f_c:.4f}"})
    rows.append({**base, "class": "mean", "n_gt": "", "n_pred": "", "tp": "", "fp": "", "fn": "",
                 "precision": "", "recall": "", "f1": f"{s.mean_f1:.4f}", "f_c": f"{s.mean_f_c:.4f}"})
    rows.append({**base, "class": "detection", "n_gt": s.tp_d + s.fn_d, "n_pred": s.tp_d + s.fp_d, "tp": s.tp_d,
                 "fp": s.fp_d, "fn": s.fn_d, "precision": f"{s.precision_d:.4f}", "recall": f"{s.recall_d:.4f}",
                 "f1": f"{s.f_d:.4f}", "f_c": f"type_acc={s.type_accuracy:.4f}"})
    return rows


def _meta() -> dict:
    return {"date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M")}  # commit, seed, machine: labs.append_csv


# --- baseline ---


def cmd_baseline(args: argparse.Namespace) -> None:
    import torch
    from sklearn.ensemble import HistGradientBoostingClassifier

    from pronet_wsi.inference import Predictor
    from pronet_wsi.training.points import read_points_classes

    torch.set_num_threads(args.threads)
    data = Path(args.data) / args.set
    classes = SETS[args.set]
    predictor = Predictor()
    test_mpp = _mpp(data, "test")
    feats: dict[str, dict] = {}
    for split in ("train", "test"):
        mpp = _mpp(data, split)
        segs = _segment_cached(data, split, predictor, "shipped")
        for stem, pts_path in ((s, p) for s, _, p in _split_files(data, split)):
            rgb, labels = segs[stem]
            ids, xy, f = nucleus_features(rgb, labels, mpp)
            g_xy, g_cls = read_points_classes(pts_path)
            feats[f"{split}/{stem}"] = {"xy": xy, "f": f, "y": _click_classes(labels, ids, g_xy, g_cls),
                                        "gt": (g_xy, g_cls)}
    test_keys = [f"test/{s}" for s, _, _ in _split_files(data, "test")]
    gt = [feats[k]["gt"] for k in test_keys]
    radius_px = RADIUS_UM / test_mpp
    meta = _meta()
    out_rows = []
    for train_split in ("train", "train10"):
        keys = [f"train/{s}" for s, _, _ in _split_files(data, train_split)]
        x = np.concatenate([feats[k]["f"] for k in keys if len(feats[k]["f"])])
        y = np.concatenate([np.asarray(feats[k]["y"], dtype=object) for k in keys if len(feats[k]["f"])])
        use = y != ""
        x, y = x[use], y[use].astype(str)
        t0 = time.perf_counter()
        clf = HistGradientBoostingClassifier(random_state=SEED).fit(x, y)
        fit_s = time.perf_counter() - t0
        counts = Counter(y.tolist())
        print(f"\n{args.set} {train_split}: {len(keys)} images, {len(y)} training nuclei with a click "
              f"({', '.join(f'{c} {counts.get(c, 0)}' for c in classes)}); fit {fit_s:.1f} s")
        majority = counts.most_common(1)[0][0]
        for method in ("hgb", "majority") if train_split == "train" else ("hgb",):
            pred = []
            for k in test_keys:
                f = feats[k]["f"]
                if method == "hgb" and len(f):
                    labels_out = clf.predict(f).astype(str).tolist()
                else:
                    labels_out = [majority] * len(feats[k]["xy"])
                pred.append((feats[k]["xy"], labels_out))
            s = _score(pred, gt, radius_px, classes)
            _report(f"{args.set} test, shipped model + {method} trained on {train_split} "
                    f"(radius {RADIUS_UM} um = {radius_px:g} px)", s)
            base = {**meta, "set": args.set, "train": train_split, "method": method, "n_train_images": len(keys),
                    "n_train_nuclei": len(y), "radius_um": RADIUS_UM, "mpp": test_mpp}
            out_rows += _rows(base, s)
    _append(RESULTS / "types_baseline.csv", out_rows)


def _append(path: Path, rows: list[dict]) -> None:
    for row in rows:
        labs.append_csv(path, row, SEED)
    print(f"\nappended {len(rows)} rows to {path.relative_to(labs.ROOT)}")


# --- score ---


def cmd_score(args: argparse.Namespace) -> None:
    import torch

    from pronet_wsi.images import read_image
    from pronet_wsi.inference import InferenceConfig, Predictor, segment_image
    from pronet_wsi.training.points import centroids_from_labels, read_points_classes

    torch.set_num_threads(args.threads)
    data = Path(args.data) / args.set
    predictor = Predictor(args.model, InferenceConfig(tta=args.tta))
    model_classes = tuple(getattr(predictor, "classes", ()) or ())
    if not model_classes:
        print(f"note: {args.model} is untyped; only its detection row (F_d) means anything")
    classes = SETS[args.set]
    mpp = _mpp(data, args.split)
    pred, gt = [], []
    t0 = time.perf_counter()
    for _, img, pts_path in _split_files(data, args.split):
        seg = segment_image(read_image(img), predictor, mpp=mpp)
        index = getattr(seg, "class_index", None)
        if index is None:
            probs = getattr(seg, "type_probs", None)
            if probs is None:
                raise SystemExit("segment_image returned no class_index (nor type_probs); the typed inference "
                                 "interface has not landed yet")
            index = np.where(np.asarray(probs).max(axis=1) > 0, np.asarray(probs).argmax(axis=1), -1)
        index = np.asarray(index, np.int64)
        xy, ids = centroids_from_labels(seg.labels)
        names = [model_classes[index[i - 1]] if 0 <= index[i - 1] < len(model_classes) else "" for i in ids]
        pred.append((xy, names))
        gt.append(read_points_classes(pts_path))
    seconds = time.perf_counter() - t0
    missing = sorted(set(classes) - set(model_classes))
    if missing:
        print(f"note: the model has no class {', '.join(missing)}; those test nuclei can only be missed")
    radius_px = RADIUS_UM / mpp
    s = _score(pred, gt, radius_px, classes)
    tta = " --tta" if args.tta else ""
    _report(f"{args.set} {args.split}, model {args.model}{tta} ({len(pred)} images, {seconds:.0f} s; radius "
            f"{RADIUS_UM} um = {radius_px:g} px)", s)
    if args.split != "test":
        return  # validation scores choose settings; only test scores are recorded
    base = {**_meta(), "set": args.set, "model": str(args.model) + tta,
            "n_test_images": len(pred), "radius_um": RADIUS_UM, "mpp": mpp, "seconds": f"{seconds:.1f}"}
    _append(RESULTS / "types_scores.csv", _rows(base, s))


def cmd_reweight(args: argparse.Namespace) -> None:
    """What `train` now does at its end (class weights, then with --classifier a nucleus classifier, on the
    held-back clicks), applied to a model trained before it: the same held-back images (the run's seed), the model
    folder copied to --out with the new thresholds.json."""
    import json
    import shutil

    import torch

    from pronet_wsi.inference import Predictor
    from pronet_wsi.training.inputs import load_items, resample_items
    from pronet_wsi.training.loop import TrainConfig, fit_types, split_holdout, tune_class_weights, tune_on_clicks

    torch.set_num_threads(args.threads)
    data = Path(args.data) / args.set / args.split
    predictor = Predictor(args.model)
    train_cfg = TrainConfig.from_json(json.loads((Path(args.model) / "train" / "train_config.json").read_text()))
    items = resample_items(load_items(data / "images", data / "points"), _mpp(Path(args.data) / args.set, args.split)
                           / predictor.mpp)
    fit, held = split_holdout(items, train_cfg.holdout, train_cfg.seed)
    radius_px = train_cfg.holdout_radius_um / predictor.mpp
    plain = replace(predictor.postprocess_config, class_weights=(), nucleus_classifier=None)
    if args.detection:  # first the centre threshold and minimum area, as `train` ends from the seventh session
        plain = tune_on_clicks(predictor, held, plain, train_cfg)
    if args.classifier:  # as `train` ends now
        thresholds = fit_types(predictor, fit, held, plain, train_cfg)
    else:
        thresholds = tune_class_weights(predictor, held, plain, radius_px)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=False)
    for name in ("config.json", "weights.pt"):
        shutil.copy2(Path(args.model) / name, out / name)
    from dataclasses import asdict

    (out / "thresholds.json").write_text(json.dumps(asdict(thresholds), indent=2) + "\n")
    print(f"{out}: class weights {thresholds.class_weights}, nucleus classifier "
          f"{'kept' if thresholds.nucleus_classifier else 'none'} (from {len(held)} held-back images)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="prepare only, into a temporary folder (does it run?); skipped without the data")
    sub = parser.add_subparsers(dest="command", required=False)
    p = sub.add_parser("prepare", help="write the split folders (symlinked images + x,y,class points)")
    p.add_argument("--out", default="runs/types")
    for name, helptext in (("baseline", "shipped model + per-nucleus measurements + gradient boosting"),
                           ("score", "a typed model on the test split")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--data", default="runs/types")
        p.add_argument("--set", choices=sorted(SETS), required=True)
        p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
        if name == "score":
            p.add_argument("--model", required=True, help="model folder of a typed model")
            p.add_argument("--split", default="test", choices=["test", "val"],
                           help="val: the validation split, to choose settings (not recorded)")
            p.add_argument("--tta", action="store_true", help="average the maps of 8 flips/rotations (predict --tta)")
    p = sub.add_parser("reweight", help="tune class weights of a trained typed model on its held-back clicks")
    p.add_argument("--data", default="runs/types")
    p.add_argument("--set", choices=sorted(SETS), required=True)
    p.add_argument("--split", default="train", help="the split the model trained on (train or train10)")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True, help="new model folder")
    p.add_argument("--classifier", action="store_true", help="then fit a nucleus classifier (pronet_wsi.classify)")
    p.add_argument("--detection", action="store_true",
                   help="first tune the centre threshold and minimum area on the held-back clicks")
    p.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.smoke and not ((labs.DATA / "consep").is_dir() and (labs.DATA / "crchisto").is_dir()):
        smoke_skip(f"CoNSeP / CRCHisto not found under {labs.DATA}")
    if args.smoke:
        import tempfile

        print(banner(SEED))
        args.command, args.out = "prepare", tempfile.mkdtemp(prefix="pronet-wsi-smoke-")
    elif args.command is None:
        parser.error("give a command: prepare, baseline or score")
    if not (labs.DATA / "consep").is_dir() or not (labs.DATA / "crchisto").is_dir():
        print(f"CoNSeP / CRCHisto not found under {labs.DATA}; this benchmark needs ../shared/data", file=sys.stderr)
        sys.exit(2)
    {"prepare": cmd_prepare, "baseline": cmd_baseline, "score": cmd_score, "reweight": cmd_reweight}[args.command](args)


if __name__ == "__main__":
    main()
