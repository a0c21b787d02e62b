"""Time pronet_wsi.metrics.evaluate_image (all metrics together) and print a table.

Cases: a 1000x1000 synthetic image with ~1000 small nuclei scored against a perturbed copy (shifted 2 px,
5 % of objects dropped, some pairs merged), and every MoNuSeg label scored against a copy shifted by 2 px
(skipped with a message when ../shared/data is absent).

    python -m benchmarks.bench_metrics [--repeats 5]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from benchmarks.record import banner
from pronet_wsi.images import read_labels
from pronet_wsi.metrics import evaluate_image, overlap_table
from pronet_wsi.synthetic import synthetic_nuclei

MONUSEG_LABELS = Path(__file__).resolve().parents[2] / "shared" / "data" / "monuseg" / "labels"


def perturb(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """Shift by 2 px, drop 5 % of the objects, merge 5 % of them into their id successor."""
    rng = np.random.default_rng(seed)
    pred = np.roll(labels, (2, 1), axis=(0, 1)).astype(np.int64)
    ids = np.unique(pred)[1:]
    pred[np.isin(pred, rng.choice(ids, ids.size // 20, replace=False))] = 0
    merged = rng.choice(ids, ids.size // 20, replace=False)
    lut = np.arange(int(pred.max()) + 2)
    lut[merged] = merged + 1
    return lut[pred]


def best_and_median(fn, repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="a 250 px synthetic case, one repeat (does it run?)")
    args = parser.parse_args()
    side = 250 if args.smoke else 1000
    args.repeats = 1 if args.smoke else args.repeats
    print(banner(seed=0))

    rows = []
    _, labels, _ = synthetic_nuclei((side, side), n_nuclei=side, radius_px=(4.0, 7.0), seed=0)
    pred = perturb(labels)
    s = evaluate_image(labels, pred)
    table_best, _ = best_and_median(lambda: overlap_table(labels, pred), args.repeats)
    best, med = best_and_median(lambda: evaluate_image(labels, pred), args.repeats)
    rows.append((f"synthetic {side}x{side}", 1, s.n_gt, s.n_pred, table_best, best, med, med, s.aji))

    if MONUSEG_LABELS.exists() and not args.smoke:
        per_image = []
        for path in sorted(MONUSEG_LABELS.glob("*.png")):
            gt = read_labels(path)
            shifted = np.roll(gt, 2, axis=0)
            t_table, _ = best_and_median(lambda gt=gt, p=shifted: overlap_table(gt, p), args.repeats)
            t_best, t_med = best_and_median(lambda gt=gt, p=shifted: evaluate_image(gt, p), args.repeats)
            per_image.append((evaluate_image(gt, shifted), t_table, t_best, t_med))
        n_gt = int(np.mean([p[0].n_gt for p in per_image]))
        rows.append(("MoNuSeg labels, shift 2 px", len(per_image), n_gt, n_gt,
                     float(np.median([p[1] for p in per_image])), float(np.median([p[2] for p in per_image])),
                     float(np.median([p[3] for p in per_image])), float(np.max([p[3] for p in per_image])),
                     float(np.mean([p[0].aji for p in per_image]))))
    else:
        print(f"MoNuSeg labels not found at {MONUSEG_LABELS}; timing the synthetic case only")

    print(f"evaluate_image timing, best/median of {args.repeats} runs per image (ms)")
    print("| case | images | n_gt | n_pred | overlap table | all metrics best | all metrics median | "
          "median, slowest image | AJI |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, n, n_gt, n_pred, t_table, best, med, worst, aji_value in rows:
        print(f"| {name} | {n} | {n_gt} | {n_pred} | {1e3 * t_table:.1f} | {1e3 * best:.1f} | {1e3 * med:.1f} | "
              f"{1e3 * worst:.1f} | {aji_value:.3f} |")


if __name__ == "__main__":
    main()
