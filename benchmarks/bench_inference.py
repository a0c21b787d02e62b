"""Inference speed of a model folder on this machine, in Mpx/s (forward only, and forward + post-processing).

    python benchmarks/bench_inference.py [-m models/pronet-multilab] [--size 1024] [--repeats 5]

Runs the shipped model (default) on random-free real-looking input (a synthetic H&E tile) in fp32 and with
autocast (bf16 on CPUs that have it), batch 1 and 4; prints a table. Goal for the shipped model: >= 1 Mpx/s
on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from pronet_wsi.inference import InferenceConfig, Predictor
from pronet_wsi.model import resolve_model_dir
from pronet_wsi.postprocess import postprocess
from pronet_wsi.synthetic import synthetic_nuclei


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    model_dir = resolve_model_dir(args.model)
    img, _, _ = synthetic_nuclei((args.size, args.size), n_nuclei=args.size * args.size // 1500, seed=0)
    print(f"model {model_dir}, torch {torch.__version__}, {torch.get_num_threads()} threads, tile {args.size} px")
    print("| precision | batch | forward Mpx/s (best) | forward + postprocess Mpx/s (best) |")
    print("|---|---|---|---|")
    for amp in ("off", "on"):
        for batch in (1, 4):
            p = Predictor(model_dir, InferenceConfig(amp=amp, batch_size=batch))
            tiles = np.repeat(img[None], batch, axis=0)
            p.predict_batch(tiles)  # warm-up (oneDNN primitive creation)
            fwd, full = [], []
            for _ in range(args.repeats):
                t = time.perf_counter()
                maps = p.predict_batch(tiles)
                t1 = time.perf_counter()
                for i in range(batch):
                    postprocess({k: v[i] for k, v in maps.items()}, p.postprocess_config)
                t2 = time.perf_counter()
                fwd.append(t1 - t)
                full.append(t2 - t)
            mpx = batch * args.size**2 / 1e6
            name = "fp32" if amp == "off" else str(p.autocast_dtype).replace("torch.", "")
            print(f"| {name} | {batch} | {mpx / min(fwd):.2f} | {mpx / min(full):.2f} |")


if __name__ == "__main__":
    main()
