"""Point annotations in and out (CSV, QuPath GeoJSON), centroids from instance masks, shift simulation.

Every array here is ``points_xy``: (N, 2) float64, level-0 pixel (x, y) in QuPath's continuous frame, the one
every file and module boundary uses: pixel ``[row, col]`` covers ``[col, col + 1) x [row, row + 1)``, so its
centre is ``(col + 0.5, row + 0.5)`` and a point lies inside an (H, W) image when ``0 <= x < W`` and
``0 <= y < H``. A click on a nucleus's centre pixel in QuPath reads back on that pixel. Training converts to the
array-index frame once (:func:`pronet_wsi.geometry.xy_to_index`, in ``dataset.prepare_samples``).

An empty file (a header, or a FeatureCollection without features) reads as a (0, 2) array; it is the
training code's job to refuse an image with no points (``pseudo_labels`` raises a ValueError for it).

Points may carry a nucleus class (:func:`read_points_classes`): a CSV column ``class``, or the
``classification.name`` of a QuPath Points annotation. An empty class, and QuPath's / pronet-wsi's generic
``Nucleus``, mean an untyped click: it trains the instance heads only.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from pronet_wsi.errors import InputError
from pronet_wsi.files import atomic_write
from pronet_wsi.geometry import as_points_xy

log = logging.getLogger(__name__)
CSV_SUFFIXES = (".csv",)
GEOJSON_SUFFIXES = (".geojson", ".json", ".geojson.gz", ".json.gz")
UNTYPED = ("", "nucleus")  # class names (lower case) that mean "a nucleus, no type"
NOT_REGION_CLASSES = ("tissue",)  # pronet-wsi's own tissue annotation: not a complete region


def _suffix(path: Path) -> str:
    """The point-file suffix, ``.geojson.gz`` counted as one."""
    name = path.name.lower()
    return next((s for s in (".geojson.gz", ".json.gz") if name.endswith(s)), path.suffix.lower())


def read_points(path: str | os.PathLike) -> np.ndarray:
    """Read points from a CSV (``x,y`` header) or a QuPath GeoJSON file (also gzipped), chosen by the suffix.

    Returns
    -------
    points_xy : (N, 2) float64, level-0 pixel (x, y), in file order.
    """
    return read_points_classes(path)[0]


def read_points_classes(path: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """Points and their nucleus classes from a CSV (``x,y[,class]``) or QuPath GeoJSON (``.gz`` too).

    Returns
    -------
    points_xy : (N, 2) float64, level-0 pixel (x, y), in file order.
    classes : N class names; "" for an untyped point (no class, an empty one, or ``Nucleus``).
    """
    path = Path(path)
    suffix = _suffix(path)
    if suffix in CSV_SUFFIXES:
        return _read_csv(path)
    if suffix in GEOJSON_SUFFIXES:
        return _read_geojson(path)
    raise InputError(f"{path}: unknown point file type {suffix!r}; give a .csv (x,y header) or a .geojson file")


def class_name(name: object) -> str:
    """A point's class as stored: stripped, "" when untyped (see :data:`UNTYPED`)."""
    text = str(name).strip() if isinstance(name, str) else ""
    return "" if text.lower() in UNTYPED else text


def write_points(path: str | os.PathLike, points_xy: np.ndarray) -> None:
    """Write points as CSV or QuPath GeoJSON (by suffix), atomically; ``read_points`` gives them back exactly."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in CSV_SUFFIXES:
        write_points_csv(path, points_xy)
    elif suffix in GEOJSON_SUFFIXES:
        write_points_geojson(path, points_xy)
    else:
        raise InputError(f"{path}: unknown point file type {suffix!r}; use .csv or .geojson")


def _read_text(path: Path) -> str:
    if not path.exists():
        raise InputError(f"{path}: file not found; check the path")
    if not path.is_file():
        raise InputError(f"{path}: not a file; give a point file (.csv or .geojson)")
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                return fh.read().decode("utf-8-sig")
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not a UTF-8 text file; give a CSV or GeoJSON point file") from exc
    except (OSError, EOFError) as exc:  # a damaged or truncated .gz
        raise InputError(f"{path}: cannot be read ({exc}); export the file again") from exc


def read_points_csv(path: str | os.PathLike) -> np.ndarray:
    """Read a CSV whose header names columns ``x`` and ``y`` (level-0 px floats); other columns are ignored."""
    return _read_csv(Path(path))[0]


def _read_csv(path: Path) -> tuple[np.ndarray, list[str]]:
    """Points and classes (column ``class`` if present) of a point CSV."""
    rows = csv.reader(_read_text(path).splitlines())
    header = next(rows, None)
    while header is not None and not any(cell.strip() for cell in header):
        header = next(rows, None)  # skip leading blank lines
    if header is None:
        raise InputError(f"{path}: empty file; a point CSV starts with a header line 'x,y'")
    names = [cell.strip().lower() for cell in header]
    if "x" not in names or "y" not in names:
        raise InputError(f"{path}:{rows.line_num}: header {','.join(header)!r} lacks columns x and y; "
                         "the first line must name them, e.g. 'x,y'")
    ix, iy = names.index("x"), names.index("y")
    ic = names.index("class") if "class" in names else None
    out: list[tuple[float, float]] = []
    classes: list[str] = []
    for row in rows:
        if not any(cell.strip() for cell in row):
            continue
        try:
            x, y = float(row[ix]), float(row[iy])
        except (IndexError, ValueError):
            raise InputError(f"{path}:{rows.line_num}: bad row {','.join(row)!r}; "
                             "expected numbers in columns x and y") from None
        if not (math.isfinite(x) and math.isfinite(y)):
            raise InputError(f"{path}:{rows.line_num}: non-finite coordinate in {','.join(row)!r}")
        out.append((x, y))
        classes.append(class_name(row[ic]) if ic is not None and ic < len(row) else "")
    return np.array(out, np.float64).reshape(-1, 2), classes


def write_points_csv(path: str | os.PathLike, points_xy: np.ndarray, classes: list[str] | None = None) -> None:
    """Write ``x,y`` rows (``x,y,class`` with ``classes``) with full float precision, atomically."""
    pts = as_points_xy(points_xy)
    if classes is not None:
        if len(classes) != len(pts):
            raise ValueError(f"{len(classes)} classes for {len(pts)} points")
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["x", "y", "class"])
        writer.writerows([repr(float(x)), repr(float(y)), c] for (x, y), c in zip(pts, classes, strict=True))
        text = buf.getvalue()
    else:
        text = "x,y\n" + "".join(f"{float(x)!r},{float(y)!r}\n" for x, y in pts)
    atomic_write(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_points_geojson(path: str | os.PathLike) -> np.ndarray:
    """Read Point / MultiPoint features (QuPath's export of point annotations), level-0 px coordinates.

    Accepts a FeatureCollection, a single Feature, a bare geometry or a list of Features. Polygon annotations
    (regions exported with the points) are skipped; any other geometry type is an error naming the feature,
    because it is usually the wrong export (cells instead of points).
    """
    return _read_geojson(Path(path))[0]


def _read_geojson(path: Path) -> tuple[np.ndarray, list[str]]:
    """Points and classes of a QuPath GeoJSON export; detections and cells are skipped with one warning."""
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); give a GeoJSON file") from None
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
        if not isinstance(features, list):
            raise InputError(f"{path}: FeatureCollection without a 'features' list")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, dict) and data.get("type") in ("Point", "MultiPoint"):
        features = [{"type": "Feature", "geometry": data}]
    elif isinstance(data, list):
        features = data
    else:
        raise InputError(f"{path}: not a GeoJSON FeatureCollection, Feature or list of features")
    out: list[list[float]] = []
    classes: list[str] = []
    n_results = 0
    for i, feature in enumerate(features):
        props = feature.get("properties") if isinstance(feature, dict) else None
        if isinstance(props, dict) and props.get("objectType") in NOT_REGIONS:
            n_results += 1  # detections / cells exported with the points: results, not clicks
            continue
        pts = _feature_points(path, i, feature)
        out.extend(pts)
        cls = props.get("classification") if isinstance(props, dict) else None
        classes.extend([class_name(cls.get("name") if isinstance(cls, dict) else None)] * len(pts))
    if n_results:
        log.warning("%s: skipped %d detection/cell objects (segmentation results, not clicks); export only "
                    "annotations to silence this", path, n_results)
    return np.array(out, np.float64).reshape(-1, 2), classes


def _feature_points(path: Path, i: int, feature: object) -> list[list[float]]:
    if not isinstance(feature, dict) or not isinstance(feature.get("geometry"), dict):
        raise InputError(f"{path}: feature {i} has no geometry; expected Point or MultiPoint features")
    geometry = feature["geometry"]
    kind = geometry.get("type")
    coords = geometry.get("coordinates")
    props = feature.get("properties")
    if not isinstance(props, dict):
        props = {}
    if kind in ("Polygon", "MultiPolygon") and props.get("objectType") == "annotation":
        return []  # a region annotation (e.g. a `suggest` box) exported with the points, not a point
    if kind == "Point":
        coords = [coords]
    elif kind != "MultiPoint":
        raise InputError(f"{path}: feature {i} is a {kind}; export point annotations (Point/MultiPoint)")
    if not isinstance(coords, list):
        raise InputError(f"{path}: feature {i} ({kind}) has no coordinate list")
    pts = []
    for xy in coords:
        if (not isinstance(xy, list) or len(xy) < 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in xy[:2])
                or not all(math.isfinite(v) for v in xy[:2])):
            raise InputError(f"{path}: feature {i} ({kind}) has a bad coordinate {xy!r}; expected [x, y] numbers")
        pts.append([float(xy[0]), float(xy[1])])
    return pts


@dataclass(frozen=True)
class Region:
    """An area whose nuclei are all clicked (a QuPath rectangle or polygon annotation).

    ``exterior`` and each of ``holes`` are (K, 2) float64 rings in QuPath's continuous level-0 (x, y) frame
    (a pixel's centre at +0.5), the same frame as ``points_xy``. ``name`` says which feature it came from, for
    messages.
    """

    name: str
    exterior: np.ndarray
    holes: tuple[np.ndarray, ...] = ()

    def bounds(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the exterior, continuous level-0."""
        x, y = self.exterior[:, 0], self.exterior[:, 1]
        return float(x.min()), float(y.min()), float(x.max()), float(y.max())


NOT_REGIONS = ("detection", "cell", "tile")  # QuPath object types that are results, not annotations


def read_regions(path: str | os.PathLike) -> list[Region]:
    """Polygon / MultiPolygon annotations of a GeoJSON file (QuPath exports rectangles as Polygons).

    Detections and cells (a segmentation result) are not regions and are skipped; so are points, and
    pronet-wsi's own tissue annotation (class ``Tissue``: it is not a complete region, so it is skipped with a
    warning). A CSV holds no regions (returns []).
    """
    path = Path(path)
    if _suffix(path) not in GEOJSON_SUFFIXES:
        return []
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); give a GeoJSON file") from None
    features = data.get("features", []) if isinstance(data, dict) and data.get("type") == "FeatureCollection" \
        else [data] if isinstance(data, dict) else data if isinstance(data, list) else []
    out: list[Region] = []
    for i, feature in enumerate(features):
        if not isinstance(feature, dict) or not isinstance(feature.get("geometry"), dict):
            continue
        props = feature.get("properties")
        if not isinstance(props, dict):
            props = {}
        if props.get("objectType") in NOT_REGIONS:
            continue
        geometry = feature["geometry"]
        kind, coords = geometry.get("type"), geometry.get("coordinates")
        if kind not in ("Polygon", "MultiPolygon"):
            continue
        cls = props.get("classification")
        cls_name = cls.get("name") if isinstance(cls, dict) else None
        if isinstance(cls_name, str) and cls_name.strip().lower() in NOT_REGION_CLASSES:
            log.warning("%s: feature %d is a %s annotation (e.g. pronet-wsi's tissue outline), not a region whose "
                        "nuclei are all clicked; skipped", path, i, cls_name)
            continue
        label = props.get("name") or cls_name or "annotation"
        polygons = [coords] if kind == "Polygon" else coords
        if not isinstance(polygons, list):
            raise InputError(f"{path}: feature {i} ({kind}) has no coordinate list")
        for j, rings in enumerate(polygons):
            try:
                arrays = [np.asarray(r, np.float64)[:, :2] for r in rings]
            except (TypeError, ValueError, IndexError):
                raise InputError(f"{path}: feature {i} ({kind}) has a bad ring; expected [[x, y], ...]") from None
            if not arrays or any(len(a) < 3 or not np.isfinite(a).all() for a in arrays):
                raise InputError(f"{path}: feature {i} ({kind}) has a ring with fewer than 3 finite points")
            suffix = f".{j}" if kind == "MultiPolygon" else ""
            out.append(Region(f"feature {i}{suffix} ({label!s})", arrays[0], tuple(arrays[1:])))
    return out


def region_mask(region: Region, origin_xy: tuple[float, float], scale: float, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: the pixels of an image whose centres lie inside ``region`` (holes excluded).

    The image's pixel ``[r, c]`` covers level-0 continuous ``origin + ([c, r] + 0.5) / scale`` at its centre,
    i.e. the image is the box starting at ``origin_xy`` read at ``scale`` image px per level-0 px.
    """
    from skimage.draw import polygon2mask

    def raster(ring: np.ndarray) -> np.ndarray:
        local = (ring - np.asarray(origin_xy)) * scale - 0.5  # continuous -> pixel-centre (index) frame
        return polygon2mask(shape, local[:, ::-1])

    mask = raster(region.exterior)
    for hole in region.holes:
        mask &= ~raster(hole)
    return mask


def write_points_geojson(path: str | os.PathLike, points_xy: np.ndarray, name: str = "Nucleus") -> None:
    """Write one QuPath point annotation (a MultiPoint feature) holding every point, atomically.

    No points gives a FeatureCollection without features.
    """
    pts = as_points_xy(points_xy)
    features = []
    if len(pts):
        features.append({
            "type": "Feature",
            "geometry": {"type": "MultiPoint", "coordinates": [[float(x), float(y)] for x, y in pts]},
            "properties": {"objectType": "annotation", "classification": {"name": name}},
        })
    text = json.dumps({"type": "FeatureCollection", "features": features})
    atomic_write(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def inside_image(points_xy: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(N,) bool: which points fall on a pixel of an image of ``shape`` (H, W)."""
    pts = as_points_xy(points_xy)
    h, w = shape[:2]
    x, y = pts[:, 0], pts[:, 1]
    return (x >= 0) & (x < w) & (y >= 0) & (y < h)


def clip_points(points_xy: np.ndarray, shape: tuple[int, int], drop_outside: bool = False,
                source: str = "points") -> tuple[np.ndarray, int]:
    """Check that every point lies in an (H, W) image.

    Parameters
    ----------
    points_xy : (N, 2) float, level-0 (x, y).
    shape : (H, W) of the image the points annotate.
    drop_outside : if False, a point outside the image is an InputError (usually the wrong image or
        coordinates at another resolution); if True such points are dropped.
    source : how to name the points in the message (e.g. the file path).

    Returns
    -------
    points_xy : (M, 2) float64, the points inside, in input order.
    n_dropped : int, how many were dropped (0 unless ``drop_outside``).
    """
    pts = as_points_xy(points_xy)
    keep = inside_image(pts, shape)
    n_out = int((~keep).sum())
    if n_out and not drop_outside:
        first = pts[~keep][0]
        raise InputError(f"{source}: {n_out} of {len(pts)} points lie outside the {shape[1]}x{shape[0]} image "
                         f"(first at x={first[0]:g}, y={first[1]:g}); check that the points belong to this image "
                         "at level 0, or drop them (--drop-outside)")
    return pts[keep], n_out


def centroids_from_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One point per instance: the float centroid of each non-zero label, where a pathologist would click.

    Parameters
    ----------
    labels : (H, W) int instance map, 0 = background.

    Returns
    -------
    centers_xy : (N, 2) float64 continuous (x, y) centroids (a one-pixel label at ``[r, c]`` gives
        ``(c + 0.5, r + 0.5)``), in increasing label-id order.
    ids : (N,) int64, the label id of each centroid.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels has shape {labels.shape}; expected an (H, W) instance map")
    ids = np.unique(labels)
    ids = ids[ids != 0].astype(np.int64)
    if ids.size == 0:
        return np.zeros((0, 2)), ids
    centers_rc = np.array(ndi.center_of_mass(np.ones(labels.shape), labels, ids), np.float64).reshape(-1, 2)
    return centers_rc[:, ::-1] + 0.5, ids


def shift_points(points_xy: np.ndarray, min_px: float, max_px: float, shape: tuple[int, int],
                 seed: int = 0) -> np.ndarray:
    """Simulate imprecise annotation: move each point by a random distance in a random direction.

    The distance is uniform in [``min_px``, ``max_px``], the direction uniform on the circle; the result is
    clipped to the centres of the image's edge pixels ([0.5, W - 0.5] x [0.5, H - 0.5]), so a point near the
    border can move less than ``min_px``.

    Returns
    -------
    shifted_xy : (N, 2) float64, level-0 (x, y); the input is not modified.
    """
    if not (0 <= min_px <= max_px):
        raise ValueError(f"shift range [{min_px}, {max_px}]: need 0 <= min_px <= max_px")
    pts = as_points_xy(points_xy)
    rng = np.random.default_rng(seed)
    dist = rng.uniform(min_px, max_px, len(pts))
    angle = rng.uniform(0.0, 2.0 * np.pi, len(pts))
    moved = pts + np.stack([dist * np.cos(angle), dist * np.sin(angle)], axis=1)
    h, w = shape[:2]
    moved[:, 0] = np.clip(moved[:, 0], 0.5, w - 0.5)
    moved[:, 1] = np.clip(moved[:, 1], 0.5, h - 0.5)
    return moved
