"""Inference speed of a model folder on this machine, in Mpx/s (forward only, and forward + post-processing).

    python -m benchmarks.bench_inference [-m models/pronet-multilab] [--size 1024] [--repeats 5] [--type-head K]

Runs the shipped model (default) on random-free real-looking input (a synthetic H&E tile) in fp32 and with
autocast (bf16 on CPUs that have it), batch 1 and 4; prints a table. Goal for the shipped model: >= 1 Mpx/s
on 2 CPU cores. ``--type-head K`` also times the same weights with a K-class type head (random), interleaved
with the untyped model in one run, and prints the time ratio (the cost of nucleus types); and the typed model
with a nucleus classifier (``pronet_wsi.classify``; its features per nucleus are the extra cost).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import torch

from benchmarks.record import banner
from pronet_wsi.inference import InferenceConfig, Predictor
from pronet_wsi.model import ModelBundle, PRONet, load_model, resolve_model_dir
from pronet_wsi.postprocess import postprocess
from pronet_wsi.synthetic import synthetic_nuclei


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--type-head", type=int, default=0, help="also time a K-class type head on the same weights")
    ap.add_argument("--smoke", action="store_true", help="128 px, one repeat (does it run?)")
    args = ap.parse_args()
    if args.smoke:
        args.size, args.repeats = 128, 1
    print(banner(seed=0))
    model_dir = resolve_model_dir(args.model)
    if args.type_head:
        compare_type_head(model_dir, args.type_head, args.size, args.repeats)
        return
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


def compare_type_head(model_dir, k: int, size: int, repeats: int) -> None:
    """Untyped vs the same weights plus a k-class type head, without and with a nucleus classifier, interleaved
    (forward + post-processing)."""
    from pronet_wsi.classify import fit_classifier, nucleus_features

    bundle = load_model(model_dir)
    cfg = replace(bundle.config, classes=tuple(f"class{i}" for i in range(k)), class_colors=())
    net = PRONet(cfg)
    net.load_state_dict(bundle.model.state_dict(), strict=False)
    typed = ModelBundle(net.eval(), cfg, bundle.thresholds)
    img, _, _ = synthetic_nuclei((size, size), n_nuclei=size * size // 1500, seed=0)
    print(f"model {model_dir} +/- a {k}-class type head, {torch.get_num_threads()} threads, tile {size} px")
    print("| precision | untyped Mpx/s | typed Mpx/s | typed / untyped time | typed + classifier Mpx/s | "
          "typed + classifier / untyped time |")
    print("|---|---|---|---|---|---|")
    for amp in ("off", "on"):
        ps = {"untyped": Predictor(bundle, InferenceConfig(amp=amp)),
              "typed": Predictor(typed, InferenceConfig(amp=amp))}
        ps["untyped"].predict_batch(img[None])  # warm-up (the typed model's is the next line)
        seg = postprocess({kk: v[0] for kk, v in ps["typed"].predict_batch(img[None]).items()},
                          bundle.thresholds)
        y = np.random.default_rng(0).integers(0, k, seg.n)  # any classifier costs the same
        clf = fit_classifier(nucleus_features(img, seg.labels, seg.type_probs, cfg.mpp), y, cfg.classes, cfg.mpp)
        configs = {"untyped": bundle.thresholds, "typed": bundle.thresholds,
                   "classifier": replace(bundle.thresholds, nucleus_classifier=clf)}
        times: dict[str, list[float]] = {n: [] for n in configs}
        for _ in range(repeats):
            for name, config in configs.items():
                p = ps["untyped" if name == "untyped" else "typed"]
                t = time.perf_counter()
                postprocess({kk: v[0] for kk, v in p.predict_batch(img[None]).items()}, config, img)
                times[name].append(time.perf_counter() - t)
        mpx = size**2 / 1e6
        name = "fp32" if amp == "off" else str(ps["untyped"].autocast_dtype).replace("torch.", "")
        u, t, c = min(times["untyped"]), min(times["typed"]), min(times["classifier"])
        print(f"| {name} | {mpx / u:.2f} | {mpx / t:.2f} | {t / u:.2f} | {mpx / c:.2f} | {c / u:.2f} |")


if __name__ == "__main__":
    main()
