"""Post-processing at half resolution: a stride-2-stem model's maps before its full-resolution refinement.

    python -m benchmarks.halfres                     # the shipped model, the four labs' validation images
    python -m benchmarks.halfres --model M --min-areas 5,10,15 --centers 0.2,0.3

Issue 20's last idea for a cheaper bf16 ``segment``: the shipped v4 runs every layer at half resolution or less
and spends ~40 % of its CPU forward on the full-resolution tail (upsampling, the refinement on [maps, RGB],
sigmoids), and post-processing and polygons on full-resolution maps are the other half of the wall time. Both
would shrink 4x if the network's half-resolution maps (before upsampling; offsets halved) were post-processed
as they are and the labels scaled back (nearest). This scores that against the full-resolution path on each lab's
validation images (mirrored beyond their edges by the model's context, as tiling does), with the minimum area
(half-resolution px) and centre threshold on small grids. PyTorch fp32 for both; validation only.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import torch

from benchmarks import labs, record


def maps_full_and_half(model, config, image: np.ndarray) -> tuple[dict, dict]:
    """The model's full-resolution maps of ``image`` and its half-resolution maps before the refinement."""
    h, w = image.shape[:2]
    pad, stride = config.context_px, config.stride
    padded = np.pad(image, ((pad, pad + (-(h + 2 * pad)) % stride), (pad, pad + (-(w + 2 * pad)) % stride), (0, 0)),
                    mode="symmetric")
    mean = torch.tensor(config.mean).view(1, 3, 1, 1)
    std = torch.tensor(config.std).view(1, 3, 1, 1)
    x = (torch.tensor(padded).permute(2, 0, 1)[None].float() / 255 - mean) / std
    heads: dict[str, torch.Tensor] = {}  # the heads' half-resolution outputs, before upsampling and refinement
    hooks = [getattr(model, f"head_{name}").register_forward_hook(
        lambda mod, inp, out, name=name: heads.__setitem__(name, out)) for name in ("binary", "offset", "center")]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for hook in hooks:
            hook.remove()
    full = {"foreground": torch.sigmoid(out["foreground"][0, 0]), "offsets": out["offsets"][0],
            "centers": torch.sigmoid(out["centers"][0, 0])}
    half = {"foreground": torch.sigmoid(heads["binary"][0, 0]), "offsets": heads["offset"][0] * config.offset_scale / 2,
            "centers": torch.sigmoid(heads["center"][0, 0])}
    full = {k: v.numpy()[..., pad : pad + h, pad : pad + w] for k, v in full.items()}
    hp, hh, hw = pad // 2, (h + 1) // 2, (w + 1) // 2
    half = {k: v.numpy()[..., hp : hp + hh, hp : hp + hw] for k, v in half.items()}
    return full, half


def upsample2(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A half-resolution label map back to ``shape`` (each pixel to its 2x2 block)."""
    return np.repeat(np.repeat(labels, 2, 0), 2, 1)[: shape[0], : shape[1]]


def half_and_back(labels: np.ndarray) -> np.ndarray:
    """True labels sampled at half resolution and scaled back: what a perfect half-resolution map could reach."""
    h, w = labels.shape
    padded = np.pad(labels, ((0, h % 2), (0, w % 2)), mode="edge")
    return upsample2(padded[1::2, 1::2], (h, w))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a stride-2-stem model folder (default: the shipped model)")
    parser.add_argument("--min-areas", default="5,10,15", help="minimum areas at half resolution, px")
    parser.add_argument("--centers", default="0.2,0.3", help="centre thresholds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="one 256 px crop per lab, one variant")
    args = parser.parse_args()
    if args.smoke:
        labs.smoke()
        args.min_areas, args.centers = "10", "0.2"
    elif not labs.available():
        raise SystemExit("needs ../shared/data (the four labs' validation images)")
    from pronet_wsi.metrics import evaluate_image, mean_scores
    from pronet_wsi.model import default_model_dir, load_model
    from pronet_wsi.postprocess import postprocess

    torch.set_num_threads(args.threads)
    bundle = load_model(args.model or default_model_dir())
    if bundle.model.refine is None:
        raise SystemExit(f"{args.model}: not a stride-2-stem model (no half-resolution maps to take)")
    thr = bundle.thresholds
    variants = {"full": None}
    for a in (int(v) for v in args.min_areas.split(",")):
        for c in (float(v) for v in args.centers.split(",")):
            variants[f"half, min area {a}, centre {c}"] = replace(thr, min_area_px=a, center_threshold=c)
    print(record.banner(seed=0))
    print(f"model {args.model or 'shipped'}; full: its thresholds (min area {thr.min_area_px} px, centre "
          f"{thr.center_threshold}); PyTorch fp32, {args.threads} threads; validation AJI, post-processing s in ()")
    print("| lab (images) | " + " | ".join(variants) + " | true labels at half resolution |")
    print("|---" * (len(variants) + 2) + "|")
    for lab in labs.LABS:
        items = labs.load(lab, "val")
        scores: dict[str, list] = {k: [] for k in variants}
        seconds = dict.fromkeys(variants, 0.0)
        ceiling = []
        for _, image, gt in items:
            ceiling.append(evaluate_image(gt, half_and_back(gt)))
            full, half = maps_full_and_half(bundle.model.eval(), bundle.config, image)
            for name, cfg in variants.items():
                t = time.perf_counter()
                if cfg is None:
                    labels = postprocess(full, thr).labels
                else:
                    labels = upsample2(postprocess(half, cfg).labels, image.shape[:2])
                seconds[name] += time.perf_counter() - t
                scores[name].append(evaluate_image(gt, labels))
        print(f"| {lab} ({len(items)}) | "
              + " | ".join(f"{mean_scores(v).aji:.4f} ({seconds[k]:.1f})" for k, v in scores.items())
              + f" | {mean_scores(ceiling).aji:.4f} |",
              flush=True)


if __name__ == "__main__":
    main()
