"""Per-nucleus (and per-cell) measurements named and defined as QuPath's cell detection writes them.

Shape comes from the outline polygon (level-0 ``(x, y)`` px, scaled to um by the slide's pixel size), so an area is
the polygon's own (shoelace) area, the one QuPath computes for the imported object. Stain comes from the pixels
of the nucleus (or cell) in the tile the model saw, after colour deconvolution with QuPath's default H&E stain
vectors. Pure functions on arrays; no files.

Names (QuPath's ``WatershedCellDetection`` + ``ObjectMeasurements``; calibrated, so lengths in um and areas in
um^2 as QuPath shows them for a slide with a pixel size): ``Nucleus: Area``, ``Nucleus: Perimeter``,
``Nucleus: Circularity``, ``Nucleus: Max caliper``, ``Nucleus: Min caliper``, ``Nucleus: Eccentricity``,
``Nucleus: Solidity``, ``Nucleus: Hematoxylin OD mean`` / ``std dev`` / ``max``, ``Nucleus: Eosin OD mean``; with
cells ``Cell: Area``, ``Cell: Eosin OD mean``, ``Cytoplasm: Area``, ``Cytoplasm: Eosin OD mean`` and
``Nucleus/Cell area ratio``. ``Cytoplasm: Area`` (cell minus nucleus) has no QuPath counterpart and is named in
its pattern; ``Solidity`` is from QuPath's shape features (``ObjectMeasurements.ShapeFeatures``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import shapely

from pronet_wsi.errors import InputError

LEVELS = ("none", "basic", "all")

#: QuPath's default H&E stain vectors ("H&E default": optical density per R, G, B; background 255).
HEMATOXYLIN_OD = (0.65111, 0.70119, 0.29049)
EOSIN_OD = (0.2159, 0.8012, 0.5581)
BACKGROUND_RGB = 255.0

SHAPE_NAMES = ("Nucleus: Area", "Nucleus: Perimeter", "Nucleus: Circularity", "Nucleus: Max caliper",
               "Nucleus: Min caliper", "Nucleus: Eccentricity", "Nucleus: Solidity")
STAIN_NAMES = ("Nucleus: Hematoxylin OD mean", "Nucleus: Hematoxylin OD std dev", "Nucleus: Hematoxylin OD max",
               "Nucleus: Eosin OD mean")
CELL_SHAPE_NAMES = ("Cell: Area", "Cytoplasm: Area", "Nucleus/Cell area ratio")
CELL_STAIN_NAMES = ("Cell: Eosin OD mean", "Cytoplasm: Eosin OD mean")


def measurement_names(level: str, cells: bool) -> tuple[str, ...]:
    """The measurement columns a run with ``level`` (``none|basic|all``) and cells on/off adds, in order."""
    if level not in LEVELS:
        raise ValueError(f"measurements={level!r}: must be one of {', '.join(LEVELS)}")
    names: tuple[str, ...] = ()
    if level in ("basic", "all"):
        names += SHAPE_NAMES + (CELL_SHAPE_NAMES if cells else ())
    if level == "all":
        names += STAIN_NAMES + (CELL_STAIN_NAMES if cells else ())
    return names


def _ragged(coords: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Edges of closed rings: start points, end points (each ring shifted to its first vertex) and ring index."""
    n = len(offsets) - 1
    ring_of = np.repeat(np.arange(n), np.diff(offsets))
    local = coords - coords[offsets[:-1]][ring_of]  # precision: moments about each ring's own first vertex
    edge = np.ones(len(coords), bool)
    edge[offsets[1:] - 1] = False  # the last vertex of a ring starts no edge (rings are closed)
    idx = np.nonzero(edge)[0]
    return local[idx], local[idx + 1], ring_of[idx]


def polygon_moments(coords: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Area and central second moments of closed rings (Green's theorem, exact for polygons).

    Returns ``area`` (N,) (unsigned) and ``mu`` (N, 3): ``(mu20, mu02, mu11)`` per unit area.
    """
    n = len(offsets) - 1
    if n == 0:
        return np.zeros(0), np.zeros((0, 3))
    p, q, ring = _ragged(np.asarray(coords, np.float64), np.asarray(offsets, np.int64))
    x0, y0, x1, y1 = p[:, 0], p[:, 1], q[:, 0], q[:, 1]
    cross = x0 * y1 - x1 * y0

    def total(v: np.ndarray) -> np.ndarray:
        return np.bincount(ring, weights=v, minlength=n)

    a = total(cross) / 2  # signed
    safe = np.where(a == 0, 1.0, a)
    cx = total((x0 + x1) * cross) / (6 * safe)
    cy = total((y0 + y1) * cross) / (6 * safe)
    sxx = total((x0 * x0 + x0 * x1 + x1 * x1) * cross) / (12 * safe)
    syy = total((y0 * y0 + y0 * y1 + y1 * y1) * cross) / (12 * safe)
    sxy = total((x0 * y1 + 2 * x0 * y0 + 2 * x1 * y1 + x1 * y0) * cross) / (24 * safe)
    mu = np.stack([sxx - cx * cx, syy - cy * cy, sxy - cx * cy], 1)
    return np.abs(a), mu


def eccentricity(mu: np.ndarray) -> np.ndarray:
    """sqrt(1 - minor^2 / major^2) of the ellipse with the same second moments (ImageJ's ellipse fit)."""
    mu20, mu02, mu11 = mu[:, 0], mu[:, 1], mu[:, 2]
    half = (mu20 + mu02) / 2
    root = np.sqrt(((mu20 - mu02) / 2) ** 2 + mu11**2)
    lam1, lam2 = half + root, np.maximum(half - root, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(lam1 > 0, np.sqrt(np.clip(1 - lam2 / lam1, 0, 1)), np.nan)


def calipers(polys: np.ndarray, hulls: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Max caliper (largest distance between two points of the outline) and min caliper (smallest width over all
    directions, from rotating calipers on the convex hull) of each polygon, in the polygons' units.

    hulls : the polygons' convex hulls when the caller has them already.
    """
    n = len(polys)
    if n == 0:
        return np.full(0, np.nan), np.full(0, np.nan)
    hulls = shapely.convex_hull(polys) if hulls is None else hulls
    coords, idx = shapely.get_coordinates(shapely.get_exterior_ring(hulls), return_index=True)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(idx, minlength=n))]).astype(np.int64)
    return _calipers(np.ascontiguousarray(coords, np.float64), offsets)


@numba.njit(cache=True, nogil=True)
def _calipers(coords, offsets):
    """Per closed hull ring ``coords[offsets[p]:offsets[p + 1]]`` (first vertex repeated last): the largest
    vertex distance, and the smallest over edges of the farthest vertex's distance from the edge's line; NaN
    for rings of fewer than 2 distinct vertices, inf where every edge has zero length."""
    n = len(offsets) - 1
    out_max, out_min = np.full(n, np.nan), np.full(n, np.nan)
    for p in range(n):
        a = offsets[p]
        k = offsets[p + 1] - a - 1  # distinct vertices
        if k < 2:
            continue
        dmax = 0.0
        for i in range(k):
            for j in range(k):
                dy, dx = coords[a + j, 0] - coords[a + i, 0], coords[a + j, 1] - coords[a + i, 1]
                dmax = max(dmax, np.sqrt(dy * dy + dx * dx))
        out_max[p] = dmax
        wmin = np.inf
        for i in range(k):
            nxt = a + (i + 1) % k
            ex, ey = coords[nxt, 0] - coords[a + i, 0], coords[nxt, 1] - coords[a + i, 1]
            length = np.sqrt(ex * ex + ey * ey)
            if length == 0:
                continue
            cmax = 0.0
            for j in range(k):
                rx, ry = coords[a + j, 0] - coords[a + i, 0], coords[a + j, 1] - coords[a + i, 1]
                cmax = max(cmax, abs(ex * ry - ey * rx))
            wmin = min(wmin, cmax / length)
        out_min[p] = wmin
    return out_max, out_min


def shape_measurements(coords: np.ndarray, offsets: np.ndarray, um_per_px: float) -> dict[str, np.ndarray]:
    """The :data:`SHAPE_NAMES` of closed rings in level-0 px, lengths in um (``um_per_px``) and areas in um^2.

    Circularity is ``4 pi area / perimeter^2`` (at most 1), solidity ``area / convex hull area``.
    """
    n = len(offsets) - 1
    area_px, mu = polygon_moments(coords, offsets)
    polys = rings_to_polygons(coords, offsets)
    perim_px = shapely.length(shapely.get_exterior_ring(polys)) if n else np.zeros(0)
    hulls = shapely.convex_hull(polys) if n else np.zeros(0, object)
    hull_area = shapely.area(hulls) if n else np.zeros(0)
    cmax, cmin = calipers(polys, hulls)
    with np.errstate(invalid="ignore", divide="ignore"):
        circ = np.minimum(4 * np.pi * area_px / perim_px**2, 1.0)
        solidity = np.minimum(area_px / hull_area, 1.0)
    values = (area_px * um_per_px**2, perim_px * um_per_px, circ, cmax * um_per_px, cmin * um_per_px,
              eccentricity(mu), solidity)
    return dict(zip(SHAPE_NAMES, values, strict=True))


def rings_to_polygons(coords: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """(N,) shapely Polygons from closed rings ``coords[offsets[i]:offsets[i + 1]]``."""
    n = len(offsets) - 1
    if n == 0:
        return np.zeros(0, object)
    ring_of = np.repeat(np.arange(n), np.diff(offsets))
    return shapely.polygons(shapely.linearrings(coords, indices=ring_of))


def stain_od(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hematoxylin and eosin optical density of each pixel, QuPath's way.

    rgb : (..., 3) uint8, e.g. (H, W, 3). Each channel's OD is ``-log10(max(I, 1) / 255)``; the stains' amounts
    come from the inverse of the matrix of QuPath's default H&E vectors and a third, residual vector orthogonal to
    both.
    Returns two float32 arrays of shape ``rgb.shape[:-1]``.
    """
    m = stain_matrix()
    inv = np.linalg.inv(m).astype(np.float32)
    od = -np.log10(np.maximum(np.asarray(rgb, np.float32), 1.0) / np.float32(BACKGROUND_RGB))
    amounts = od.reshape(-1, 3) @ inv
    shape = np.shape(rgb)[:-1]
    return amounts[:, 0].reshape(shape), amounts[:, 1].reshape(shape)


def _stain_tables() -> tuple[np.ndarray, np.ndarray]:
    """The OD of each 8-bit value (256,) and the inverse stain matrix's hematoxylin and eosin columns (3, 2), both
    float32 as :func:`stain_od` computes them."""
    inv = np.linalg.inv(stain_matrix()).astype(np.float32)
    od = -np.log10(np.maximum(np.arange(256, dtype=np.float32), 1.0) / np.float32(BACKGROUND_RGB))
    return od.astype(np.float32), np.ascontiguousarray(inv[:, :2])


@numba.njit(cache=True, nogil=True, inline="always")
def stain_amount(od: np.ndarray, column: np.ndarray, red: int, green: int, blue: int) -> float:
    """One stain's amount at a pixel as float32 ``od @ inv`` gives it: exact products accumulated in order with
    one rounding each (a fused multiply-add chain, what BLAS does; a plain sum differs in the last bit)."""
    acc = np.float32(np.float64(od[red]) * np.float64(column[0]))
    acc = np.float32(np.float64(acc) + np.float64(od[green]) * np.float64(column[1]))
    acc = np.float32(np.float64(acc) + np.float64(od[blue]) * np.float64(column[2]))
    return np.float64(acc)


@numba.njit(cache=True, nogil=True)
def _stain_sums(labels: np.ndarray, image: np.ndarray, od: np.ndarray, inv: np.ndarray, n: int) -> np.ndarray:
    """(5, n + 1): per label 0..n, pixel count, hematoxylin sum, sum of squares and max, eosin sum; one pass over
    the labelled pixels in raster order (the order ``np.bincount`` sums them in)."""
    out = np.zeros((5, n + 1))
    out[3, :] = -np.inf
    hcol, ecol = inv[:, 0].copy(), inv[:, 1].copy()
    h, w = labels.shape
    for r in range(h):
        for c in range(w):
            k = labels[r, c]
            if k <= 0 or k > n:
                continue
            red, green, blue = image[r, c, 0], image[r, c, 1], image[r, c, 2]
            hema = stain_amount(od, hcol, red, green, blue)
            out[0, k] += 1.0
            out[1, k] += hema
            out[2, k] += hema * hema
            out[3, k] = max(out[3, k], hema)
            out[4, k] += stain_amount(od, ecol, red, green, blue)
    return out


def stain_stats(labels: np.ndarray, image: np.ndarray, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Hematoxylin OD mean, std dev and max and eosin OD mean over the pixels of each label in ``ids``.

    labels : (H, W) int, 0 = none; image : (H, W, 3) uint8. The per-label statistics of :func:`stain_od`'s
    values (std dev with n - 1; NaN without pixels, or with fewer than two for the std dev, as QuPath's
    RunningStatistics), from one pass over the labelled pixels (gathering them, deconvolving and summing by label
    took ~50 ms of a 2112² tile). Keys ``h_mean``, ``h_std``, ``h_max``, ``e_mean``.
    """
    ids = np.asarray(ids, np.int64)
    n = int(max(np.max(labels, initial=0), ids.max(initial=0)))
    sums = _stain_sums(np.ascontiguousarray(labels), np.ascontiguousarray(image, np.uint8), *STAIN_TABLES, n)
    count, s, s2, vmax, e = (row[ids] for row in sums)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, s / count, np.nan)
        var = np.where(count > 1, (s2 - count * mean**2) / (count - 1), np.nan)
        e_mean = np.where(count > 0, e / count, np.nan)
    return {"h_mean": mean, "h_std": np.sqrt(np.maximum(var, 0)), "h_max": np.where(count > 0, vmax, np.nan),
            "e_mean": e_mean}


@numba.njit(cache=True, nogil=True)
def label_sums(labels: np.ndarray, n: int, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per label 0..n of a 2-D label image: pixel count, the sum of ``weights`` (float64, raster order, as
    ``np.bincount``) and the bounding box ``(r0, c0, r1, c1)`` (``scipy.ndimage.find_objects``'s slices; all 0
    where a label is absent), in one pass. Labels outside 1..n are ignored."""
    count = np.zeros(n + 1, np.int64)
    total = np.zeros(n + 1)
    box = np.zeros((n + 1, 4), np.int64)
    h, w = labels.shape
    for r in range(h):
        for c in range(w):
            k = labels[r, c]
            if k <= 0 or k > n:
                continue
            if count[k] == 0:
                box[k, 0], box[k, 1], box[k, 2], box[k, 3] = r, c, r + 1, c + 1
            else:
                box[k, 1] = min(box[k, 1], c)
                box[k, 2] = r + 1
                box[k, 3] = max(box[k, 3], c + 1)
            count[k] += 1
            total[k] += weights[r, c]
    return count, total, box


def stain_matrix() -> np.ndarray:
    """(3, 3) rows: unit hematoxylin, eosin and residual OD vectors (R, G, B)."""
    h = np.asarray(HEMATOXYLIN_OD, np.float64)
    e = np.asarray(EOSIN_OD, np.float64)
    h, e = h / np.linalg.norm(h), e / np.linalg.norm(e)
    r = np.cross(h, e)
    return np.stack([h, e, r / np.linalg.norm(r)])


#: :func:`_stain_tables`: the 8-bit OD table and the hematoxylin and eosin columns of the inverse stain matrix.
STAIN_TABLES = _stain_tables()


@dataclass(frozen=True)
class MeasureConfig:
    """What to measure per nucleus and whether to grow cells.

    level : ``none`` (only the detection's own four: areas, centre score, foreground probability), ``basic``
        (+ shape), ``all`` (+ stain: hematoxylin / eosin OD).
    cells_um : grow each nucleus by up to this many um into a cell (QuPath's cellExpansion); 0 = no cells.
    """

    level: str = "all"
    cells_um: float = 0.0

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise InputError(f"measurements={self.level!r}: must be one of {', '.join(LEVELS)}")
        if not 0.0 <= self.cells_um <= 50.0:
            raise InputError(f"cells_um={self.cells_um}: must be between 0 (no cells) and 50 um")

    @property
    def names(self) -> tuple[str, ...]:
        return measurement_names(self.level, self.cells_um > 0)
