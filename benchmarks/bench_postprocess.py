"""Speed of maps -> instances (centre peaks + paper Eq. 1 grouping) on 1000x1000 maps.

    python -m benchmarks.bench_postprocess

Synthetic: oracle maps of ~2000 small nuclei; real: oracle maps of the densest MoNuSeg labels (if present).
Prints best/median of 5 runs. Target: < 0.5 s for 1000x1000 with 2000 centres.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from benchmarks.record import banner
from pronet_wsi.postprocess import postprocess
from pronet_wsi.synthetic import synthetic_nuclei
from pronet_wsi.training.targets import encode_maps

MONUSEG = Path(__file__).resolve().parents[2] / "shared" / "data" / "monuseg" / "labels"


def bench(labels: np.ndarray, repeats: int = 5) -> tuple[float, float, int]:
    maps = encode_maps(labels)
    times, n = [], 0
    for _ in range(repeats):
        t = time.perf_counter()
        n = postprocess(maps).n
        times.append(time.perf_counter() - t)
    return min(times), float(np.median(times)), n


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a 250 px synthetic case, one run (does it run?)")
    args = parser.parse_args()
    side, repeats = (250, 1) if args.smoke else (1000, 5)
    print(banner(seed=0))
    cases = []
    _, labels, _ = synthetic_nuclei((side, side), n_nuclei=side * 2, radius_px=(4, 7), seed=0,
                                    min_separation_px=9)
    cases.append((f"synthetic {side}x{side}", labels))
    if MONUSEG.exists() and not args.smoke:
        from pronet_wsi.images import read_labels

        for name in ("TCGA-HE-7130-01Z-00-DX1", "TCGA-KB-A93J-01A-01-TS1"):
            cases.append((f"MoNuSeg {name[:12]}", read_labels(MONUSEG / f"{name}.png")))
    else:
        print(f"(MoNuSeg labels not found at {MONUSEG}; synthetic case only)")
    print("| case | nuclei in | instances out | best (s) | median (s) |")
    print("|---|---|---|---|---|")
    for name, lab in cases:
        best, med, n = bench(lab, repeats)
        print(f"| {name} | {len(np.unique(lab)) - 1} | {n} | {best:.3f} | {med:.3f} |")


if __name__ == "__main__":
    main()
