"""Training inputs from disk: images with point files or instance maps, validation pairs, slide regions.

Everything here reads files and returns items ``(name, image, points_xy[, region[, classes]])`` (points in the
continuous frame of point files) or validation triples ``(name, image, labels)``; :mod:`.dataset` turns items
into samples and patches.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pronet_wsi.errors import InputError
from pronet_wsi.images import IMAGE_SUFFIXES, find_labels, read_image, read_labels
from pronet_wsi.training import points as points_io

log = logging.getLogger(__name__)


def find_points_file(points_dir: Path, stem: str) -> Path | None:
    for suffix in (".csv", ".geojson", ".json", ".geojson.gz"):
        p = points_dir / f"{stem}{suffix}"
        if p.is_file():
            return p
    return None


def load_items(images: str | Path, points: str | Path | None = None, labels: str | Path | None = None,
               names: list[str] | None = None, shift: tuple[float, float] | None = None, seed: int = 0,
               drop_outside: bool = False, drop_unmatched: bool = False) -> list[tuple]:
    """Read (name, image, points_xy, None, classes) for every image in a folder (``classes``: a class name per
    point, "" = untyped; see :func:`~pronet_wsi.training.points.read_points_classes`).

    Points come from ``points`` (a folder of ``<stem>.csv`` / ``<stem>.geojson``) or are derived from
    instance labels in ``labels`` (``<stem>.png``/``.tif``; centroids, optionally shifted by
    ``shift = (min_px, max_px)``). ``names`` restricts to those stems. Images without a points file and point
    files without an image are an InputError listing them, or with ``drop_unmatched`` a warning (logged) and
    left out; none matched at all is an error.
    """
    images = Path(images)
    if not images.is_dir():
        raise InputError(f"--images {images}: not a folder of images")
    if (points is None) == (labels is None):
        raise InputError("give exactly one of --points (folder of point files) or --labels (instance maps)")
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if names is not None:
        wanted = set(names)
        files = [p for p in files if p.stem in wanted]
        missing = wanted - {p.stem for p in files}
        if missing:
            raise InputError(f"--images {images}: no image for {sorted(missing)[:3]}")
    if not files:
        raise InputError(f"--images {images}: folder holds no images")
    if points is not None:
        files = _match_points(files, Path(points), names, drop_unmatched)
    items = []
    for i, path in enumerate(files):
        image = read_image(path)
        if labels is not None:
            lab_path = find_labels(Path(labels), path.stem)
            if lab_path is None:
                raise InputError(f"--labels {labels}: no instance map for {path.stem} (.png or .tif)")
            pts, _ = points_io.centroids_from_labels(read_labels(lab_path))
            if shift is not None and shift[1] > 0:
                pts = points_io.shift_points(pts, shift[0], shift[1], image.shape[:2], seed=seed + i)
            classes = [""] * len(pts)
        else:
            assert points is not None  # exactly one of points / labels, checked above
            pf = find_points_file(Path(points), path.stem)
            if pf is None:
                continue
            pts, classes = points_io.read_points_classes(pf)
        keep = points_io.inside_image(pts, image.shape[:2])
        pts, _ = points_io.clip_points(pts, image.shape[:2], drop_outside=drop_outside,
                                       source=str(pf) if labels is None else str(path))
        classes = [c for c, k in zip(classes, keep, strict=True) if k]
        if len(pts) == 0:
            continue
        items.append((path.stem, image, pts, None, classes))
    if not items:
        raise InputError(f"no image in {images} has points; expected <stem>.csv or <stem>.geojson in {points}")
    return items


POINT_SUFFIXES = (".csv", ".geojson")  # .json is read as points too, but a folder may hold other JSON files


def _match_points(files: list[Path], points_dir: Path, names: list[str] | None, drop_unmatched: bool) -> list[Path]:
    """The images that have a points file; the unmatched on either side are an error (or a warning)."""
    if not points_dir.is_dir():
        raise InputError(f"--points {points_dir}: not a folder of <stem>.csv / <stem>.geojson point files")
    stems = {p.stem for p in files}
    no_points = [p.name for p in files if find_points_file(points_dir, p.stem) is None]
    no_image = sorted(p.name for p in points_dir.iterdir() if p.is_file() and p.suffix.lower() in POINT_SUFFIXES
                      and not p.name.startswith(".") and p.stem not in stems and (names is None or p.stem in names))
    if not no_points and not no_image:
        return files
    parts = []
    if no_points:
        parts.append(f"{len(no_points)} image(s) without a points file ({_some(no_points)})")
    if no_image:
        parts.append(f"{len(no_image)} points file(s) without an image ({_some(no_image)})")
    msg = f"--images/--points: {' and '.join(parts)}"
    if not drop_unmatched:
        raise InputError(f"{msg}; add the missing files, or pass --drop-unmatched to train on the matched pairs")
    log.warning("%s; left out (--drop-unmatched)", msg)
    return [p for p in files if p.name not in set(no_points)]


def _some(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")




def item_classes(items: list[tuple]) -> tuple[str, ...]:
    """The sorted nucleus class names of the training items' points ("" = untyped is not a class)."""
    return tuple(sorted({c for it in items if len(it) > 4 and it[4] is not None for c in it[4] if c}))


def resample_items(items: list[tuple], scale: float) -> list[tuple]:
    """Items of images at another pixel size, brought to the model's: images resized by ``scale`` (model px per
    image px), points scaled in the continuous frame, region masks resized (nearest)."""
    from pronet_wsi.inference import resample_image, resample_labels

    if abs(scale - 1.0) < 1e-3:
        return items
    out = []
    for name, image, pts, *rest in items:
        work = resample_image(image, scale)
        factor = np.array([work.shape[1] / image.shape[1], work.shape[0] / image.shape[0]])
        region = rest[0] if rest else None
        if region is not None:
            region = resample_labels(region.astype(np.uint8), work.shape[:2]).astype(bool)
        out.append((name, work, np.asarray(pts, np.float64) * factor, region, *rest[1:]))
    return out


def load_val_items(images: str | Path, labels: str | Path, names: list[str] | None = None
                   ) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, image, instance map) for validation scoring."""
    images, labels = Path(images), Path(labels)
    files = sorted(p for p in Path(images).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if images.is_dir() else []
    if names is not None:
        files = [p for p in files if p.stem in set(names)]
    if not files:
        raise InputError(f"--val-images {images}: no images found")
    out = []
    for p in files:
        lab = find_labels(labels, p.stem)
        if lab is None:
            raise InputError(f"--val-labels {labels}: no instance map for {p.stem}")
        out.append((p.stem, read_image(p), read_labels(lab)))
    return out


def load_slide_items(slide_path: str | Path, points_path: str | Path, mpp: float, slide_mpp: float | None = None,
                     region_px: int = 1024, drop_outside: bool = False, regions_path: str | Path | None = None,
                     margin_px: int = 64) -> list[tuple]:
    """Training images cut from a whole-slide image: one or more per complete-annotation region.

    Regions are the polygon / rectangle annotations exported with the points (or those of ``regions_path``):
    every nucleus inside a region is clicked, so an unclicked area there is background, and nothing outside a
    region is trained on. Each region's bounding box, grown by ``margin_px`` of context, is read at the model's
    ``mpp`` in pieces of at most ``region_px`` (+ margin) square; an item is (name, image, points_xy in the
    piece's pixel frame, region mask of the piece, class name per point). A region without points, or points
    outside every region, give a warning naming them; no region at all is an error that says how to add them.
    """
    from pronet_wsi.geometry import Box
    from pronet_wsi.slide import open_slide

    pts, names = points_io.read_points_classes(points_path)
    if len(pts) == 0:
        raise InputError(f"{points_path}: no points; annotate nuclei as points in QuPath and export them")
    regions = points_io.read_regions(regions_path if regions_path is not None else points_path)
    if not regions:
        where = regions_path if regions_path is not None else points_path
        raise InputError(f"{where}: no region annotations; in QuPath draw a rectangle around each area whose "
                         "nuclei you clicked (all of them), then export points and rectangles together (File > "
                         "Export objects as GeoJSON, all objects), or give them separately with --regions")
    items: list[tuple] = []
    with open_slide(slide_path, mpp=slide_mpp) as slide:
        keep = points_io.inside_image(pts, slide.shape)
        pts, _ = points_io.clip_points(pts, slide.shape, drop_outside=drop_outside, source=str(points_path))
        names = [c for c, k in zip(names, keep, strict=True) if k]
        used = np.zeros(len(pts), bool)
        scale = slide.mpp / mpp  # model px per level-0 px
        for k, region in enumerate(regions):
            x0, y0, x1, y1 = region.bounds()
            n_in = 0
            nx, ny = (max(1, int(np.ceil((b - a) * scale / region_px))) for a, b in ((x0, x1), (y0, y1)))
            for iy in range(ny):
                for ix in range(nx):  # piece core in level-0 continuous coordinates, then the margin around it
                    cx0, cy0 = x0 + ix * region_px / scale, y0 + iy * region_px / scale
                    cx1, cy1 = min(x1, cx0 + region_px / scale), min(y1, cy0 + region_px / scale)
                    ox, oy = cx0 - margin_px / scale, cy0 - margin_px / scale
                    w = int(np.ceil((cx1 - cx0) * scale)) + 2 * margin_px
                    h = int(np.ceil((cy1 - cy0) * scale)) + 2 * margin_px
                    mask = points_io.region_mask(region, (ox, oy), scale, (h, w))
                    core = np.zeros((h, w), bool)
                    core[margin_px:h - margin_px, margin_px:w - margin_px] = True
                    mask &= core
                    local = (pts - [ox, oy]) * scale  # level-0 continuous -> the piece's continuous frame
                    inside = points_io.inside_image(local, (h, w))
                    rr = np.clip(np.floor(local[:, 1]).astype(int), 0, h - 1)
                    cc = np.clip(np.floor(local[:, 0]).astype(int), 0, w - 1)
                    in_region = inside & mask[rr, cc]
                    used |= in_region
                    n_in += int(in_region.sum())
                    if not mask.any() or not in_region.any():
                        continue
                    image = slide.read_box(Box(ox, oy, ox + w / scale, oy + h / scale), (h, w))
                    items.append((f"{Path(slide_path).stem}_r{k}_{ix}_{iy}", image, local[inside], mask,
                                  [c for c, i in zip(names, inside, strict=True) if i]))
            if n_in == 0:
                log.warning("%s: region %s holds no points and is not trained on; click its nuclei or delete it",
                            points_path, region.name)
        if (~used).any():
            first = pts[~used][0]
            log.warning("%s: %d of %d points lie outside every region (first at x=%.0f, y=%.0f) and are not "
                        "trained on; draw a region around them", points_path, int((~used).sum()), len(pts),
                        first[0], first[1])
    if not items:
        raise InputError(f"{points_path}: no region holds points; draw the regions around the clicked nuclei")
    return items


def read_slide_list(path: str | Path) -> list[tuple[Path, Path, float | None, Path | None]]:
    """Rows of a CSV with columns ``slide,points`` and optional ``mpp`` and ``regions`` (paths relative to the
    CSV's folder): many slides for one ``train --slide-list``."""
    import csv

    path = Path(path)
    if not path.is_file():
        raise InputError(f"--slide-list {path}: file not found")
    rows = list(csv.DictReader(path.read_text(encoding="utf-8-sig").splitlines()))
    if not rows or not {"slide", "points"} <= {k.strip().lower() for k in rows[0] if k}:
        raise InputError(f"--slide-list {path}: expected a header 'slide,points[,mpp][,regions]' and one row per "
                         "slide")
    out = []
    for i, row in enumerate(rows, start=2):
        row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
        if not row["slide"] or not row["points"]:
            raise InputError(f"{path}:{i}: slide and points are both needed")
        try:
            mpp = float(row["mpp"]) if row.get("mpp") else None
        except ValueError:
            raise InputError(f"{path}:{i}: mpp {row['mpp']!r} is not a number (um per pixel, e.g. 0.25)") from None
        regions = path.parent / row["regions"] if row.get("regions") else None
        out.append((path.parent / row["slide"], path.parent / row["points"], mpp, regions))
    return out
