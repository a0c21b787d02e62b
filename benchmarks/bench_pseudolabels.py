"""Time the pseudo labels V + K of one MoNuSeg image against the paper's way of computing them.

Ours: ``pseudo_labels`` -- one multi-source numba raster scan that carries the nearest point's index (run to
convergence), V from that partition, K by k-means fitted on 20 000 sampled pixels and predicting all of them.

Paper-style: GeodisTK ``geodesic2d_raster_scan`` once per point (2 iterations, GeodisTK's customary setting,
which favours the baseline) and a running minimum / argmin over the per-point maps, then k-means fitted on
all pixels (both k-means runs in one OpenMP thread). Two variants:

* cropped: each call sees only a (2 * 70 + 1)^2 px window around its point (d* = 70 read as pixels); pixels
  outside every window keep distance 1e10. Timed over every point.
* uncropped: each call sees the whole image. Timed on ``--subset`` points and extrapolated linearly to all
  points (one call costs the same whatever the point).

Needs ../shared/data (MoNuSeg) and GeodisTK (CPPFLAGS=-DNPY_IN_ARRAY=NPY_ARRAY_IN_ARRAY pip install
--no-build-isolation GeodisTK==0.1.7).

    python -m benchmarks.bench_pseudolabels [--image TCGA-HE-7130-01Z-00-DX1] [--subset 8]
    python -m benchmarks.bench_pseudolabels --sweep   # quality of V and K against lam
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.record import banner, smoke_skip
from pronet_wsi.geometry import xy_to_index
from pronet_wsi.images import read_image, read_labels
from pronet_wsi.training.points import centroids_from_labels
from pronet_wsi.training.pseudolabels import (
    FOREGROUND,
    IGNORE,
    PseudoLabelConfig,
    cluster_label,
    geodesic_voronoi,
    pseudo_labels,
    voronoi_label,
)

MONUSEG = Path(__file__).resolve().parents[2] / "shared" / "data" / "monuseg"
SWEEP_IMAGES = ["TCGA-18-5592-01Z-00-DX1", "TCGA-38-6178-01Z-00-DX1", "TCGA-A7-A13E-01Z-00-DX1",
                "TCGA-B0-5711-01Z-00-DX1"]  # training split, one per organ


CROP: int | None = None  # --smoke: the top-left CROP x CROP px only


def load(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    labels = read_labels(MONUSEG / "labels" / f"{name}.png")[:CROP, :CROP]
    points_xy = xy_to_index(centroids_from_labels(labels)[0])  # the array frame pseudo_labels works in
    return read_image(MONUSEG / "images" / f"{name}.tif")[:CROP, :CROP], points_xy, labels


def best_of(fn, repeats: int) -> tuple[float, object]:
    best, out = np.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def per_point_geodistk(image: np.ndarray, seeds_rc: np.ndarray, lam: float, half: int | None,
                       iterations: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """The paper's loop: one GeodisTK call per point, keep the minimum distance and its point."""
    import GeodisTK

    h, w = image.shape[:2]
    img = image.astype(np.float32)
    best = np.full((h, w), 1e10, np.float32)
    nearest = np.full((h, w), -1, np.int32)
    for i, (r, c) in enumerate(seeds_rc):
        r0, r1 = (0, h) if half is None else (max(r - half, 0), min(r + half + 1, h))
        c0, c1 = (0, w) if half is None else (max(c - half, 0), min(c + half + 1, w))
        mask = np.zeros((r1 - r0, c1 - c0), np.uint8)
        mask[r - r0, c - c0] = 1
        d = GeodisTK.geodesic2d_raster_scan(np.ascontiguousarray(img[r0:r1, c0:c1]), mask, lam, iterations)
        window = best[r0:r1, c0:c1]
        closer = d < window
        window[closer] = d[closer]
        nearest[r0:r1, c0:c1][closer] = i
    return best, nearest


def full_kmeans(image: np.ndarray, distance: np.ndarray, d_star: float) -> np.ndarray:
    """K the straightforward way: k-means fitted on every pixel."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    f = np.concatenate([np.minimum(distance, d_star).reshape(-1, 1), image.reshape(-1, 3)], 1).astype(np.float32)
    f = (f - f.mean(0)) / f.std(0)
    with threadpool_limits(limits=1, user_api="openmp"):  # as ours: threads only slow k-means down here
        km = KMeans(n_clusters=3, n_init=3, random_state=0).fit(f)
    lut = np.empty(3, np.uint8)
    lut[np.argsort(km.cluster_centers_[:, 0])] = (FOREGROUND, IGNORE, 0)
    return lut[km.labels_].reshape(distance.shape)


def speed(name: str, subset: int, repeats: int) -> None:
    image, points_xy, _ = load(name)
    config = PseudoLabelConfig()
    seeds_rc = np.rint(points_xy[:, ::-1]).astype(np.int64)
    pseudo_labels(image[:64, :64], points_xy[:1] * 0 + 5, config)  # compile / import outside the timing
    t_ours, (v, k) = best_of(lambda: pseudo_labels(image, points_xy, config), repeats)
    t_ours_v, (dist, near) = best_of(lambda: geodesic_voronoi(image, points_xy[:, ::-1], config.lam,
                                                              config.iterations), repeats)
    t_ours_k, _ = best_of(lambda: cluster_label(image, dist, config.d_star, config.seed), repeats)

    half = int(config.d_star)
    t0 = time.perf_counter()
    crop_dist, crop_near = per_point_geodistk(image, seeds_rc, config.lam, half)
    t_crop_v = time.perf_counter() - t0
    voronoi_label(crop_near, points_xy[:, ::-1], config.point_radius_px)
    t0 = time.perf_counter()
    full_kmeans(image, crop_dist, config.d_star)
    t_full_k = time.perf_counter() - t0
    pick = np.random.default_rng(0).choice(len(seeds_rc), min(subset, len(seeds_rc)), replace=False)
    t0 = time.perf_counter()
    per_point_geodistk(image, seeds_rc[pick], config.lam, None)
    t_call = (time.perf_counter() - t0) / len(pick)
    t_full_v = t_call * len(seeds_rc)

    agree = float((crop_near == near).mean())
    rows = [
        ("ours: distance + partition, one multi-source scan (converged)", t_ours_v, "measured"),
        ("ours: K (k-means on 20k sampled px, predict all)", t_ours_k, "measured"),
        ("ours: V + K (pseudo_labels)", t_ours, f"measured, best of {repeats}"),
        ("paper-style, cropped: GeodisTK per point in 141x141 window", t_crop_v, "measured, all points"),
        ("paper-style, uncropped: GeodisTK per point on 1000x1000", t_full_v,
         f"extrapolated: {t_call * 1e3:.0f} ms/call x {len(seeds_rc)} (timed {len(pick)} calls)"),
        ("paper-style: K (k-means on all px)", t_full_k, "measured"),
        ("paper-style cropped V + K", t_crop_v + t_full_k, "sum"),
        ("paper-style uncropped V + K", t_full_v + t_full_k, "sum"),
    ]
    print(f"{name}: {image.shape[1]}x{image.shape[0]}, {len(points_xy)} points, lam={config.lam}, "
          f"d*={config.d_star}; 2-core CPU")
    print("| step | seconds | how |\n|---|---|---|")
    for label, sec, how in rows:
        print(f"| {label} | {sec:.3f} | {how} |")
    print(f"\nspeed-up of V + K: {(t_crop_v + t_full_k) / t_ours:.0f}x over cropped, "
          f"{(t_full_v + t_full_k) / t_ours:.0f}x over uncropped (extrapolated); ours {t_ours:.2f} s")
    print(f"cells agreeing with the cropped 2-iteration per-point result: {agree:.1%} of pixels")


def sweep(lams: list[float], iterations: list[int]) -> None:
    """Quality of V and K against ground truth, ground-truth centroids as points, mean over SWEEP_IMAGES."""
    data = [load(n) for n in SWEEP_IMAGES]
    print(f"mean over {len(data)} MoNuSeg training images; points = ground-truth centroids; d* = 70")
    print("| lam | iterations | nucleus px in another nucleus's cell | V edge px inside nuclei | "
          "median d inside / outside nuclei | K fg precision | K fg recall | K bg precision | K bg recall |")
    print("|---|---|---|---|---|---|---|---|---|")
    for lam in lams:
        for iters in iterations:
            res = []
            for image, points_xy, labels in data:
                truth = labels > 0
                dist, near = geodesic_voronoi(image, points_xy[:, ::-1], lam, iters)
                ids = np.unique(labels)[1:]
                own = np.zeros(int(labels.max()) + 1, np.int64)
                own[ids] = np.arange(len(ids))
                wrong = (near[truth] != own[labels[truth]]).mean()
                v = voronoi_label(near, points_xy[:, ::-1], 0)
                k = cluster_label(image, dist, 70.0, 0)
                fg, bg = k == 1, k == 0
                res.append((wrong, truth[v == 0].mean(), np.median(dist[truth]), np.median(dist[~truth]),
                            truth[fg].mean(), (fg & truth).sum() / truth.sum(),
                            (~truth[bg]).mean(), (bg & ~truth).sum() / (~truth).sum()))
            m = np.mean(res, 0)
            name = "Euclidean (exact)" if lam == 0 else f"{lam:g}"
            print(f"| {name} | {iters} | {m[0]:.3f} | {m[1]:.3f} | {m[2]:.0f} / {m[3]:.0f} | {m[4]:.3f} | "
                  f"{m[5]:.3f} | {m[6]:.3f} | {m[7]:.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="TCGA-HE-7130-01Z-00-DX1", help="MoNuSeg stem (default: most nuclei)")
    parser.add_argument("--subset", type=int, default=8, help="points timed for the uncropped extrapolation")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sweep", action="store_true", help="print quality against lam instead of timings")
    parser.add_argument("--smoke", action="store_true", help="a 160 px crop, 2 points, one repeat (does it run?)")
    args = parser.parse_args()
    if not MONUSEG.exists():
        if args.smoke:
            smoke_skip(f"{MONUSEG} is absent")
        sys.exit(f"skipped: {MONUSEG} is absent")
    print(banner(seed=0))
    if args.smoke:
        global CROP
        CROP, args.subset, args.repeats = 160, 2, 1
    if args.sweep:
        sweep([0.0, 0.5, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0], [32])
        sweep([0.8], [2])
        return
    try:
        import GeodisTK  # noqa: F401
    except ImportError:
        if args.smoke:
            smoke_skip("GeodisTK is not installed")
        sys.exit("skipped: GeodisTK is not installed (see the module docstring)")
    speed(args.image, args.subset, args.repeats)


if __name__ == "__main__":
    main()
