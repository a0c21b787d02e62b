"""Train and score models on the four labs in ../shared/data (MoNuSeg, NuInsSeg, Emory GBM40, CoNSeP).

    python -m benchmarks.multilab pseudo                      # pseudo-label fg recall/precision per dataset
    python -m benchmarks.multilab train -o runs/multilab --init default --max-minutes 60
    python -m benchmarks.multilab train -o runs/no-consep --without consep ...   # leave one lab out
    python -m benchmarks.multilab score models/pronet-multilab --split test --tag shipped-v1

Splits and pixel sizes: benchmarks/labs.py. Training uses points (label centroids) only; validation (threshold
tuning, checkpoint choice) uses the val parts of the labs it trains on; `score --split test` is run once per
finished model and appends rows to benchmarks/results/multilab.csv.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import click
import numpy as np

from benchmarks import labs
from benchmarks.record import banner

RESULTS = labs.ROOT / "benchmarks" / "results" / "multilab.csv"
FIELDS = ["model", "dataset", "split", "images", "object_dice", "aji", "pixel_dice", "pq", "mpp_in", "tta"]


@click.group()
@click.option("--smoke", is_flag=True, help="Every split: its first image cropped to 256 px; rows to a temporary "
                                            "folder (does it run?).")
def cli(smoke: bool) -> None:
    if smoke:
        labs.smoke()  # ends cleanly without ../shared/data
    if not labs.available():
        click.echo(f"datasets not found under {labs.DATA}; this benchmark needs ../shared/data", err=True)
        sys.exit(2)
    click.echo(banner(seed=None), err=True)


@cli.command()
@click.option("--split", default="train")
@click.option("--datasets", default=",".join(labs.LABS))
def pseudo(split: str, datasets: str) -> None:
    """Foreground recall / precision of V and K against the instance masks, before and after the stain fixes."""
    from pronet_wsi.geometry import xy_to_index
    from pronet_wsi.training.points import centroids_from_labels
    from pronet_wsi.training.pseudolabels import FOREGROUND, PseudoLabelConfig, pseudo_labels

    holes = PseudoLabelConfig.fill_holes_px  # every row names what it sets, whatever the defaults become
    configs = {"before (rgb k-means)": PseudoLabelConfig(hematoxylin=False, fill_holes_px=0),
               f"holes only ({holes} px)": PseudoLabelConfig(hematoxylin=False, fill_holes_px=holes),
               "hematoxylin only": PseudoLabelConfig(hematoxylin=True, fill_holes_px=0),
               f"+hematoxylin, holes ({holes} px)": PseudoLabelConfig(hematoxylin=True, fill_holes_px=holes)}
    click.echo("| dataset | pseudo labels | V fg recall | V fg precision | K fg recall | K fg precision | K ignore % |")
    click.echo("|---|---|---|---|---|---|---|")
    for name in datasets.split(","):
        items = labs.load(name, split)
        for cname, cfg in configs.items():
            tot = np.zeros(6)
            for _, image, gt in items:
                pts, _ = centroids_from_labels(gt)
                if not len(pts):
                    continue
                v, k = pseudo_labels(image, xy_to_index(pts), cfg)
                fg = gt > 0
                tot += [(v == FOREGROUND).sum(), ((v == FOREGROUND) & fg).sum(), (k == FOREGROUND).sum(),
                        ((k == FOREGROUND) & fg).sum(), fg.sum(), (k == 2).mean()]
            n = len(items)
            click.echo(f"| {name} | {cname} | {tot[1] / tot[4]:.3f} | {tot[1] / tot[0]:.3f} | {tot[3] / tot[4]:.3f} "
                       f"| {tot[3] / tot[2]:.3f} | {100 * tot[5] / n:.0f} |")


@cli.command()
@click.option("-o", "--outdir", required=True, type=click.Path(path_type=Path))
@click.option("--without", multiple=True, type=click.Choice(list(labs.LABS)), help="Leave this lab out entirely.")
@click.option("--init", default=None, help="Model folder (or 'default') to start from.")
@click.option("--max-minutes", type=float, default=60.0)
@click.option("--epochs", default=40)
@click.option("--lr", default=5e-4)
@click.option("--threads", type=int, default=2)
@click.option("--patches-per-mpx", default=8, help="Patches per epoch per megapixel of training image.")
@click.option("--predict-every", default=3, help="Epochs between full-image predictions (offset targets, E-step).")
@click.option("--val-every", default=3)
@click.option("--mpp", type=float, default=labs.MODEL_MPP,
              help="The model's pixel size: images resampled to it (with --init at another, the start model is "
                   "rescaled and fine-tuned).")
@click.option("--resume", is_flag=True)
def train(outdir, without, init, max_minutes, epochs, lr, threads, patches_per_mpx, predict_every, val_every,
          mpp, resume) -> None:
    """Train on the train parts of every lab not left out; validate and tune on their val parts."""
    from pronet_wsi.training.loop import TrainConfig
    from pronet_wsi.training.loop import train as run_train

    names = [n for n in labs.LABS if n not in without]
    items, val = [], []
    for n in names:
        items += labs.points_items(labs.load(n, "train", mpp))
        val += labs.load(n, "val", mpp)
    click.echo(f"train on {names}: {len(items)} images, {sum(len(p) for _, _, p in items)} points; "
               f"{len(val)} validation images", err=True)
    start = 0 if init else None
    config = TrainConfig(epochs=epochs, width=0.25, lr=lr, weight_decay=1e-4, schedule="cosine",
                         warmup_epochs=0 if init else 1, init=init, max_minutes=max_minutes, num_threads=threads,
                         offset_start_epoch=start if start is not None else round(epochs * 20 / 150),
                         refine_start_epoch=start if start is not None else round(epochs * 30 / 150),
                         patches_by_area=True, patches_per_image=patches_per_mpx, predict_every=predict_every,
                         val_every=val_every, mpp=mpp)
    if resume:
        import json

        from pronet_wsi.training.loop import TrainConfig as TC

        config = replace(TC.from_json(json.loads((outdir / "train" / "train_config.json").read_text())),
                         max_minutes=max_minutes)
    t0 = time.monotonic()
    run_train(config, items, outdir, val_items=val, resume=resume, progress=False)
    click.echo(f"trained in {(time.monotonic() - t0) / 60:.1f} min -> {outdir}", err=True)


@cli.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--split", default="test", type=click.Choice(["train", "val", "test"]))
@click.option("--tag", required=True, help="Name of the model in the results table.")
@click.option("--datasets", default=",".join(labs.LABS))
@click.option("--mpp-in", type=float, default=None,
              help="Feed the images at this pixel size (resampled) and score against full-resolution labels.")
@click.option("--tta", is_flag=True)
@click.option("--upsample-maps", is_flag=True,
              help="With --mpp-in finer than the model's: post-process on the maps upsampled (bilinear) to the "
                   "input's pixels instead of on the model's grid with the labels scaled back.")
@click.option("--no-record", is_flag=True, help="Print only (e.g. for validation-time choices).")
@click.option("--runtime", default="auto", type=click.Choice(["auto", "torch", "openvino"]),
              help="The forward's engine (pronet_wsi/runtime.py).")
@click.option("--amp", default="auto", type=click.Choice(["auto", "on", "off"]), help="off = fp32, on = bf16 on CPU.")
def score(model_dir, split, tag, datasets, mpp_in, tta, upsample_maps, no_record, runtime, amp) -> None:
    """Score a model folder on each dataset's ``split``; append rows to the results CSV."""
    from pronet_wsi.inference import InferenceConfig, Predictor, resample_image, resample_labels, segment_image
    from pronet_wsi.metrics import evaluate_image, mean_scores

    predictor = Predictor(model_dir, InferenceConfig(tta=tta, runtime=runtime, amp=amp))
    click.echo(f"runtime {predictor.runtime}, autocast {predictor.autocast_dtype}", err=True)
    for name in datasets.split(","):
        items = labs.load(name, split)
        scores = []
        for _, image, gt in items:
            if mpp_in and upsample_maps:
                low = resample_image(image, labs.MODEL_MPP / mpp_in)
                pred = resample_labels(_upsampled_segment(low, predictor, mpp_in).labels, gt.shape)
            elif mpp_in:
                low = resample_image(image, labs.MODEL_MPP / mpp_in)
                seg = segment_image(low, predictor, mpp=mpp_in)
                pred = resample_labels(seg.labels, gt.shape)
            else:
                pred = segment_image(image, predictor).labels
            scores.append(evaluate_image(gt, pred))
        m = mean_scores(scores)
        row = {"model": tag, "dataset": name, "split": split, "images": len(items),
               "object_dice": round(m.object_dice, 4), "aji": round(m.aji, 4), "pixel_dice": round(m.pixel_dice, 4),
               "pq": round(m.pq, 4), "mpp_in": mpp_in or "", "tta": int(tta)}
        click.echo({**row, "upsample_maps": upsample_maps})
        if not no_record:
            labs.append_csv(RESULTS, {k: row[k] for k in FIELDS}, seed=None)


def _upsampled_segment(image, predictor, mpp: float):
    """Instances of ``image`` (at ``mpp``) from the model's maps at its own (coarser) grid, upsampled to the
    image's pixels before post-processing: offsets and the pixel-sized thresholds scaled by the factor."""
    from dataclasses import replace

    import torch
    import torch.nn.functional as F

    from pronet_wsi.inference import resample_image
    from pronet_wsi.postprocess import postprocess

    f = predictor.mpp / mpp
    maps = predictor.predict_image(resample_image(image, 1 / f))
    up = {}
    for key, value in maps.items():
        t = torch.as_tensor(np.asarray(value, np.float32))
        t = t[None, None] if t.ndim == 2 else t[None]
        t = F.interpolate(t, size=image.shape[:2], mode="bilinear", align_corners=False)[0]
        up[key] = (t[0] if np.asarray(value).ndim == 2 else t).numpy()
    up["offsets"] = up["offsets"] * f
    cfg = predictor.postprocess_config
    nms = int(round(cfg.nms_px * f))
    cfg = replace(cfg, min_area_px=int(round(cfg.min_area_px * f * f)), nms_px=nms + 1 - nms % 2)
    return postprocess(up, cfg, image)


@cli.command()
@click.option("--split", default="test", type=click.Choice(["val", "test"]))
def classical(split: str) -> None:
    """The hematoxylin / Otsu / watershed baseline (benchmarks/classical.py) on each dataset's split."""
    from benchmarks.classical import ClassicalConfig, segment_classical
    from pronet_wsi.metrics import evaluate_image, mean_scores

    for name in labs.LABS:
        items = labs.load(name, split)
        m = mean_scores([evaluate_image(gt, segment_classical(im, ClassicalConfig())) for _, im, gt in items])
        row = {"model": "classical", "dataset": name, "split": split, "images": len(items),
               "object_dice": round(m.object_dice, 4), "aji": round(m.aji, 4), "pixel_dice": round(m.pixel_dice, 4),
               "pq": round(m.pq, 4), "mpp_in": "", "tta": 0}
        click.echo(row)
        labs.append_csv(RESULTS, {k: row[k] for k in FIELDS}, seed=None)


if __name__ == "__main__":
    cli()
