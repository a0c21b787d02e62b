"""Pseudo labels from points (paper 2.1): the geodesic Voronoi label V and the k-means cluster label K.

Labels are (H, W) uint8 with 0 = background, 1 = foreground, 2 = ignore.

The distance is GeodisTK's ``geodesic2d_raster_scan`` metric: the step between 8-neighbours p, q costs
``d_sp / ((1 - lam) + lam / (||I_p - I_q||_2 + 1e-5))`` with d_sp = 1 or sqrt(2), and the map is built by
forward and backward raster passes. Here one pass starts from ALL points at once and carries the index of the
point each distance came from, so the same sweep gives the distance to the nearest point and the geodesic
Voronoi partition (GeodisTK computes one point at a time).

Input scale. The image is used as given, RGB 0-255 (the way GeodisTK's own demo passes ``float32(PIL image)``).
The scale matters: a step costs about ``d_sp * g / lam`` where the colour difference g is well below
``lam / (1 - lam)`` and saturates at ``d_sp / (1 - lam)`` above it. Feeding 0-1 instead is the same as dividing
``lam / (1 - lam)`` by 255.

Defaults for MoNuSeg (40x, ~0.25 um/px), measured on 4 training images with ground-truth centroids as points
(``benchmarks/bench_pseudolabels.py --sweep``, recorded in benchmarks/RESULTS.md):

* ``lam = 0.8``: the colour knee lam / (1 - lam) = 4 grey levels sits at flat-region noise, a saturated
  step costs 5, and the paper's d* = 70 then falls between the median distance inside nuclei (32) and outside
  them (87). Of lam in {0, 0.5, 0.7, 0.8, 0.85, 0.9, 0.95, 1}, it gives K the best foreground precision/recall
  balance (0.77 / 0.82, against 0.67 / 0.84 for Euclidean distance); larger lam makes K's foreground purer but
  it misses most nucleus pixels (lam = 0.95: 0.93 / 0.43). The partition V hardly depends on lam <= 0.8
  (3.1-3.2 % of nucleus pixels fall in a neighbour's cell, as with Euclidean distance) and gets worse above
  (4.5 % at lam = 1): below lam = 1 a step costs at most 1 / (1 - lam), so a one-pixel colour edge is no
  dearer than a few noisy steps, and the boundaries stay close to the Euclidean ones on real H&E.
* ``iterations = 32`` is an upper bound: the sweep stops as soon as a full forward + backward pass changes
  nothing, which happened after 11-21 passes on 5 MoNuSeg images (~5 ms a pass at 1000x1000). At GeodisTK's
  customary 2 iterations about 3 % of pixels sit in another cell than at convergence, and some cells break
  into pieces (which ``geodesic_voronoi`` then hands to the cell they touch).

``lam = 0`` (and ``geodesic=False``) is the Euclidean ablation. It is computed exactly (scipy's Euclidean
distance transform) and not by the raster scan, whose 8-neighbour chamfer metric overestimates Euclidean
distance by up to 8 % and moves about 2 % of pixels to another cell.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
from scipy import ndimage as ndi

from pronet_wsi.errors import InputError

BACKGROUND, FOREGROUND, IGNORE = 0, 1, 2
UNREACHED = np.float32(1.0e10)  # distance of pixels no point reaches (GeodisTK's initial value)


@dataclass(frozen=True)
class PseudoLabelConfig:
    """Knobs of the pseudo labels.

    lam : geodesic weight in [0, 1] (0 = Euclidean, 1 = colour only); see the module docstring.
    iterations : most forward + backward raster passes (the sweep stops early once nothing changes).
    d_star : distance truncation for the k-means feature (paper: 70 MoNuSeg, 90 CPM17), in distance units.
    point_radius_px : radius of the foreground disk drawn at each point in V (kept inside the point's cell).
    seed : k-means initialisation and pixel subsample.
    geodesic : False = Euclidean distance (the paper's ablation), whatever ``lam`` says.
    kmeans_samples : pixels sampled to fit k-means (all pixels are then predicted).
    hematoxylin : add the hematoxylin density (colour deconvolution) to the k-means features, so a pale
        (vesicular) nucleus groups with its dark rim instead of with the background (measured in
        benchmarks/RESULTS.md, "Pseudo-label quality").
    fill_holes_px : background/ignore holes of at most this many pixels inside K's foreground become
        foreground (the pale interior of a vesicular nucleus); 0 switches it off.
    """

    lam: float = 0.8
    iterations: int = 32
    d_star: float = 70.0
    point_radius_px: float = 2.0
    seed: int = 0
    geodesic: bool = True
    kmeans_samples: int = 20000
    hematoxylin: bool = False
    fill_holes_px: int = 400

    def __post_init__(self) -> None:
        if not 0.0 <= self.lam <= 1.0:
            raise InputError(f"lam={self.lam}: must be in [0, 1] (0 = Euclidean, 1 = colour only)")
        if int(self.iterations) != self.iterations or self.iterations < 1:
            raise InputError(f"iterations={self.iterations}: must be an integer >= 1")
        if not self.d_star > 0:
            raise InputError(f"d_star={self.d_star}: must be > 0 (paper: 70 MoNuSeg, 90 CPM17)")
        if not 0 <= self.point_radius_px <= 20:
            raise InputError(f"point_radius_px={self.point_radius_px}: must be in [0, 20]")
        if self.kmeans_samples < 100:
            raise InputError(f"kmeans_samples={self.kmeans_samples}: must be >= 100")
        if self.fill_holes_px < 0:
            raise InputError(f"fill_holes_px={self.fill_holes_px}: must be >= 0 (0 = off)")


def pseudo_labels(image: np.ndarray, points_xy: np.ndarray,
                  config: PseudoLabelConfig = PseudoLabelConfig()) -> tuple[np.ndarray, np.ndarray]:
    """Voronoi label V and cluster label K of one image; see :func:`pseudo_labels_with_cells`."""
    voronoi, cluster, _ = pseudo_labels_with_cells(image, points_xy, config)
    return voronoi, cluster


def pseudo_labels_with_cells(image: np.ndarray, points_xy: np.ndarray,
                             config: PseudoLabelConfig = PseudoLabelConfig()
                             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voronoi label V, cluster label K and the Voronoi cells (the call the training code makes).

    Parameters
    ----------
    image : (H, W, 3) uint8 RGB.
    points_xy : (N, 2) float, level-0 (x, y), N >= 1, every point inside the image.
    config : PseudoLabelConfig.

    Returns
    -------
    voronoi, cluster : (H, W) uint8 each, 0 background, 1 foreground, 2 ignore.
    cells : (H, W) int32, index into ``points_xy`` of each pixel's (geodesic) Voronoi cell, -1 none; the
        offset targets and the EM refinement use it.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image is {image.dtype} {image.shape}; expected (H, W, 3) uint8 RGB")
    points_xy = np.asarray(points_xy, np.float64).reshape(-1, 2)
    if len(points_xy) == 0:
        raise ValueError("no points: pseudo labels need at least one point annotation per image; "
                         "annotate the image or leave it out of training")
    points_rc = points_xy[:, ::-1]
    lam = config.lam if config.geodesic else 0.0
    distance, nearest = geodesic_voronoi(image, points_rc, lam, config.iterations)
    voronoi = voronoi_label(nearest, points_rc, config.point_radius_px)
    cluster = cluster_label(image, distance, config.d_star, config.seed, config.kmeans_samples,
                            config.hematoxylin, config.fill_holes_px)
    return voronoi, cluster, nearest


def geodesic_voronoi(image: np.ndarray, points_rc: np.ndarray, lam: float = 0.8,
                     iterations: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Distance to the nearest point and the nearest point's index, from all points in one sweep.

    Parameters
    ----------
    image : (H, W, C) or (H, W), any numeric dtype, used as float32 without rescaling (pass RGB 0-255).
    points_rc : (N, 2) float (row, col); each is snapped to its pixel (rounded), which must be in the image.
        Points sharing a pixel: the first one owns it, the later ones get no cell.
    lam : GeodisTK's lambda in [0, 1]; 0 gives the exact Euclidean distance (see the module docstring).
    iterations : most raster passes; stops early at convergence. Up to convergence, identical to
        ``GeodisTK.geodesic2d_raster_scan(image, seeds, lam, iterations)`` with all points as seeds.

    Returns
    -------
    distance : (H, W) float32, distance to the nearest point (1e10 where no point reaches, i.e. N = 0).
    nearest : (H, W) int32, index into ``points_rc`` of that point (-1 where none). A piece of a cell cut
        off from its point (possible before convergence, or at exact ties) is given to the cell it touches, so
        each cell is one 8-connected region holding its point.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise ValueError(f"image has shape {image.shape}; expected (H, W) or (H, W, C)")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam={lam}: must be in [0, 1]")
    shape = image.shape[:2]
    seeds_rc = _seed_pixels(points_rc, shape)
    if len(seeds_rc) == 0:
        return np.full(shape, UNREACHED, np.float32), np.full(shape, -1, np.int32)
    if lam == 0.0:
        distance, nearest = _euclidean_voronoi(shape, seeds_rc)
    else:
        costs = _edge_costs(np.ascontiguousarray(image, dtype=np.float32), np.float64(lam))
        distance, nearest = _raster_scan(costs, seeds_rc, int(iterations))
    return distance, _join_fragments(nearest, seeds_rc)


def _seed_pixels(points_rc: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    pts = np.asarray(points_rc, np.float64).reshape(-1, 2)
    if not np.isfinite(pts).all():
        raise ValueError("points hold NaN or infinite coordinates")
    seeds = np.rint(pts).astype(np.int64)
    bad = (seeds[:, 0] < 0) | (seeds[:, 0] >= shape[0]) | (seeds[:, 1] < 0) | (seeds[:, 1] >= shape[1])
    if bad.any():
        r, c = pts[bad][0]
        raise ValueError(f"{int(bad.sum())} points lie outside the {shape[1]}x{shape[0]} image "
                         f"(first at row={r:g}, col={c:g}); clip or drop them first (points.clip_points)")
    return seeds


def _euclidean_voronoi(shape: tuple[int, int], seeds_rc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    owner = np.full(shape, -1, np.int32)
    owner[seeds_rc[::-1, 0], seeds_rc[::-1, 1]] = np.arange(len(seeds_rc), dtype=np.int32)[::-1]  # first wins
    distance, (ir, ic) = ndi.distance_transform_edt(owner < 0, return_indices=True)
    return distance.astype(np.float32), owner[ir, ic]


def _join_fragments(nearest: np.ndarray, seeds_rc: np.ndarray) -> np.ndarray:
    """Give pieces of a cell cut off from its point (unconverged raster scan) to the touching cell."""
    from skimage.measure import label

    pieces = label(nearest + 1, background=0, connectivity=2)
    keep = np.zeros(int(pieces.max()) + 1, bool)
    keep[pieces[seeds_rc[:, 0], seeds_rc[:, 1]]] = True
    stray = ~keep[pieces]
    if not stray.any():
        return nearest
    _, (ir, ic) = ndi.distance_transform_edt(stray, return_indices=True)
    return nearest[ir, ic]


def voronoi_label(nearest: np.ndarray, points_rc: np.ndarray, point_radius_px: float = 2.0) -> np.ndarray:
    """V: 0 on cell edges (pixels with a 4-neighbour in another cell), 1 on a disk at each point, 2 elsewhere.

    Parameters
    ----------
    nearest : (H, W) int, cell index of each pixel (from ``geodesic_voronoi``).
    points_rc : (N, 2) float (row, col); each disk is drawn inside its own cell only, over any edge.
    point_radius_px : disk radius (0 = the point's pixel only).

    Returns
    -------
    voronoi : (H, W) uint8.
    """
    nearest = np.asarray(nearest)
    out = np.full(nearest.shape, IGNORE, np.uint8)
    horizontal = nearest[:, 1:] != nearest[:, :-1]
    vertical = nearest[1:] != nearest[:-1]
    out[:, 1:][horizontal] = BACKGROUND
    out[:, :-1][horizontal] = BACKGROUND
    out[1:][vertical] = BACKGROUND
    out[:-1][vertical] = BACKGROUND
    seeds_rc = _seed_pixels(points_rc, nearest.shape)
    _paint_disks(out, nearest.astype(np.int32, copy=False), seeds_rc, np.float64(point_radius_px), FOREGROUND)
    return out


def cluster_label(image: np.ndarray, distance: np.ndarray, d_star: float = 70.0, seed: int = 0,
                  samples: int = 20000, hematoxylin: bool = False, fill_holes_px: int = 0) -> np.ndarray:
    """K: k-means (3 clusters) on standardised (min(d, d*), r, g, b[, hematoxylin]) features.

    The cluster whose centre has the smallest distance feature is foreground, the largest background, the
    middle one ignore. K-means is fitted on ``samples`` pixels drawn with ``seed`` and predicts every pixel, in
    one OpenMP thread (measured 16 ms against 700 ms with sklearn's default threads on the shared 2-core box).

    Parameters
    ----------
    image : (H, W, 3) RGB (0-255).
    distance : (H, W) float, distance to the nearest point.

    Returns
    -------
    cluster : (H, W) uint8.
    """
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    h, w = distance.shape
    features = np.empty((h * w, 5 if hematoxylin else 4), np.float32)
    features[:, 0] = np.minimum(distance, d_star).ravel()
    features[:, 1:4] = np.asarray(image, np.float32).reshape(h * w, -1)[:, :3]
    if hematoxylin:
        features[:, 4] = hematoxylin_density(image).ravel()
    mean = features.mean(axis=0, dtype=np.float64)
    std = features.std(axis=0, dtype=np.float64)
    features -= mean.astype(np.float32)
    features /= np.where(std > 0, std, 1.0).astype(np.float32)
    rng = np.random.default_rng(seed)
    fit = features if len(features) <= samples else features[rng.choice(len(features), samples, replace=False)]
    with threadpool_limits(limits=1, user_api="openmp"):  # 20k x 4 is too small to gain from threads; on a
        kmeans = KMeans(n_clusters=3, n_init=3, random_state=seed).fit(fit)  # busy machine they cost 40x
        assigned = kmeans.predict(features)
    order = np.argsort(kmeans.cluster_centers_[:, 0], kind="stable")
    lut = np.empty(3, np.uint8)
    lut[order] = (FOREGROUND, IGNORE, BACKGROUND)
    cluster = lut[assigned].reshape(h, w)
    if fill_holes_px:
        from skimage.morphology import remove_small_holes

        fg = cluster == FOREGROUND
        cluster[remove_small_holes(fg, max_size=fill_holes_px) & ~fg] = FOREGROUND
    return cluster


def hematoxylin_density(image: np.ndarray) -> np.ndarray:
    """(H, W) float32 hematoxylin optical density of an RGB uint8 image (Ruifrok-Johnston deconvolution)."""
    from skimage.color import rgb2hed

    return rgb2hed(np.asarray(image)[..., :3]).astype(np.float32)[..., 0]


def figure_pseudo_labels(image: np.ndarray, voronoi: np.ndarray, cluster: np.ndarray,
                         points_xy: np.ndarray | None = None, title: str = ""):
    """Paper Fig. 2 style figure: image | V | K, labels in green (fg), red (bg), black (ignore) over the image.

    Returns a matplotlib Figure on the Agg canvas (no pyplot, no global backend change); save it with
    ``fig.savefig(path)``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    colours = np.array([[220, 30, 30], [30, 200, 30], [0, 0, 0]], np.float32)  # bg red, fg green, ignore black
    base = np.asarray(image, np.float32)[..., :3]

    def overlay(lab: np.ndarray) -> np.ndarray:
        return (0.35 * base + 0.65 * colours[lab]).astype(np.uint8)

    fig = Figure(figsize=(15, 5.4), dpi=100)
    FigureCanvasAgg(fig)
    panels = [(image, "(a) image and points"), (overlay(voronoi), "(b) Voronoi label V"),
              (overlay(cluster), "(c) cluster label K")]
    for k, (picture, name) in enumerate(panels):
        ax = fig.add_subplot(1, 3, k + 1)
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(name)
        ax.set_axis_off()
        if k == 0 and points_xy is not None and len(points_xy):
            ax.plot(points_xy[:, 0], points_xy[:, 1], "o", ms=2, color="yellow")
    fig.suptitle(title or "pseudo labels: green foreground, red background, black ignore")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return fig


@numba.njit(cache=True)
def _edge_costs(img, lam):  # pragma: no cover - compiled
    """costs[k, h, w]: GeodisTK step cost from (h, w) to its neighbour k (right, down, down-right, down-left)."""
    height, width, channels = img.shape
    costs = np.full((4, height, width), np.inf, np.float32)
    dh = (0, 1, 1, 1)
    dw = (1, 0, 1, -1)
    s2 = np.float32(math.sqrt(2.0))
    length = (np.float32(1.0), np.float32(1.0), s2, s2)
    for h in range(height):
        for w in range(width):
            for k in range(4):
                nh, nw = h + dh[k], w + dw[k]
                if nh >= height or nw < 0 or nw >= width:
                    continue
                sq = np.float32(0.0)
                for c in range(channels):
                    d = img[h, w, c] - img[nh, nw, c]
                    sq += d * d
                l2 = np.float32(math.sqrt(sq))
                speed = np.float32((1.0 - lam) + lam / (np.float64(l2) + 1e-5))  # as GeodisTK: double, then float
                costs[k, h, w] = length[k] / speed
    return costs


@numba.njit(cache=True)
def _raster_scan(costs, seeds_rc, iterations):  # pragma: no cover - compiled
    _, height, width = costs.shape
    dist = np.full((height, width), np.float32(1.0e10), np.float32)
    near = np.full((height, width), -1, np.int32)
    for i in range(seeds_rc.shape[0]):
        r, c = seeds_rc[i, 0], seeds_rc[i, 1]
        if near[r, c] < 0:
            dist[r, c] = 0.0
            near[r, c] = i
    right, down, down_right, down_left = costs[0], costs[1], costs[2], costs[3]
    for _ in range(iterations):
        changed = 0
        for h in range(height):  # forward: neighbours above and to the left, in GeodisTK's order
            for w in range(width):
                best = dist[h, w]
                lab = near[h, w]
                if h > 0:
                    if w > 0:
                        t = dist[h - 1, w - 1] + down_right[h - 1, w - 1]
                        if t < best:
                            best, lab = t, near[h - 1, w - 1]
                    t = dist[h - 1, w] + down[h - 1, w]
                    if t < best:
                        best, lab = t, near[h - 1, w]
                    if w < width - 1:
                        t = dist[h - 1, w + 1] + down_left[h - 1, w + 1]
                        if t < best:
                            best, lab = t, near[h - 1, w + 1]
                if w > 0:
                    t = dist[h, w - 1] + right[h, w - 1]
                    if t < best:
                        best, lab = t, near[h, w - 1]
                if best < dist[h, w]:
                    dist[h, w] = best
                    near[h, w] = lab
                    changed += 1
        for h in range(height - 1, -1, -1):  # backward: neighbours below and to the right
            for w in range(width - 1, -1, -1):
                best = dist[h, w]
                lab = near[h, w]
                if w < width - 1:
                    t = dist[h, w + 1] + right[h, w]
                    if t < best:
                        best, lab = t, near[h, w + 1]
                if h < height - 1:
                    if w > 0:
                        t = dist[h + 1, w - 1] + down_left[h, w]
                        if t < best:
                            best, lab = t, near[h + 1, w - 1]
                    t = dist[h + 1, w] + down[h, w]
                    if t < best:
                        best, lab = t, near[h + 1, w]
                    if w < width - 1:
                        t = dist[h + 1, w + 1] + down_right[h, w]
                        if t < best:
                            best, lab = t, near[h + 1, w + 1]
                if best < dist[h, w]:
                    dist[h, w] = best
                    near[h, w] = lab
                    changed += 1
        if changed == 0:
            break
    return dist, near


@numba.njit(cache=True)
def _paint_disks(out, nearest, seeds_rc, radius, value):  # pragma: no cover - compiled
    height, width = out.shape
    reach = int(math.floor(radius))
    r2 = radius * radius
    for i in range(seeds_rc.shape[0]):
        r0, c0 = seeds_rc[i, 0], seeds_rc[i, 1]
        owner = nearest[r0, c0]
        for r in range(max(r0 - reach, 0), min(r0 + reach + 1, height)):
            for c in range(max(c0 - reach, 0), min(c0 + reach + 1, width)):
                if (r - r0) ** 2 + (c - c0) ** 2 <= r2 and nearest[r, c] == owner:
                    out[r, c] = value
