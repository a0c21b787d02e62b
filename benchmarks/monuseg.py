"""Train and evaluate one PROnet configuration on MoNuSeg end to end; render the paper's tables.

    python benchmarks/monuseg.py run --config full --shift 0 0 --epochs 60 -o runs/full-s0
    python benchmarks/monuseg.py table

`run` trains on Qu et al.'s 12 training images (points = GT centroids, optionally shifted), validates and tunes
thresholds on the 4 validation images, evaluates once on the 14 test images, and appends a row to
benchmarks/results/monuseg.csv. Masks are used for validation and test scores only, never for training.
Reads ../shared/data/monuseg; exits with a message when it is absent.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
MONUSEG = ROOT.parent / "shared" / "data" / "monuseg"
RESULTS = ROOT / "benchmarks" / "results" / "monuseg.csv"
FIELDS = ["config", "shift", "seed", "train_minutes", "epochs", "object_dice", "aji", "pixel_dice", "pq"]
PAPER_T1 = {"0-0": (75.0, 55.5), "2-4": (74.8, 54.8), "4-6": (73.3, 53.2), "6-8": (72.5, 50.9)}
PAPER_T2 = {  # (offset, geo, refine) rows of Table 2, MoNuSeg, object Dice / AJI per shift band
    "baseline_cc": None,
    "no_offsets": {"0-0": (73.6, 54.2), "2-4": (73.6, 54.2), "4-6": (68.0, 42.6), "6-8": (64.0, 38.5)},
    "euclidean": {"0-0": (74.6, 55.4), "2-4": (74.7, 54.7), "4-6": (72.6, 50.2), "6-8": (70.3, 47.4)},
    "no_refine": {"0-0": (75.0, 55.3), "2-4": (74.2, 54.4), "4-6": (72.5, 52.0), "6-8": (67.5, 42.0)},
    "full": {k: v for k, v in PAPER_T1.items()},
}
CONFIGS = {
    "full": {},
    "no_offsets": {"use_offsets": False, "grouping": "nearest_center"},
    "euclidean": {"geodesic": False},
    "no_refine": {"use_refinement": False},
    "baseline_cc": {"geodesic": False, "use_offsets": False, "grouping": "components"},
}


def split() -> dict[str, list[str]]:
    raw = json.loads((MONUSEG / "splits" / "train_val_test.json").read_text())
    return {k: [n.split("_", 1)[1].rsplit(".", 1)[0] for n in v] for k, v in raw.items()}


@click.group()
def cli() -> None:
    if not MONUSEG.exists():
        click.echo(f"MoNuSeg not found at {MONUSEG}; this benchmark needs ../shared/data", err=True)
        sys.exit(2)


@cli.command()
@click.option("--config", "name", type=click.Choice(list(CONFIGS)), default="full")
@click.option("--shift", nargs=2, type=int, default=(0, 0))
@click.option("--seed", default=0)
@click.option("--epochs", default=60)
@click.option("--width", default=0.25)
@click.option("--lr", default=1e-3)
@click.option("--weight-decay", default=1e-4)
@click.option("--patches-per-image", default=16)
@click.option("--max-minutes", type=float, default=58.0)
@click.option("--threads", type=int, default=None)
@click.option("--resume", is_flag=True)
@click.option("--tag", default="", help="Recipe label appended to the config name in the results (e.g. 20min1t).")
@click.option("-o", "--outdir", required=True, type=click.Path(path_type=Path))
def run(name, shift, seed, epochs, width, lr, weight_decay, patches_per_image, max_minutes, threads, resume, tag,
        outdir):
    """Train one configuration, evaluate on the test split, append a results row."""
    from pronet_wsi.inference import InferenceConfig, Predictor, segment_image
    from pronet_wsi.metrics import evaluate_image, mean_scores
    from pronet_wsi.training.dataset import load_items, load_val_items
    from pronet_wsi.training.loop import TrainConfig, train
    from pronet_wsi.training.pseudolabels import PseudoLabelConfig

    s = split()
    opts = dict(CONFIGS[name])
    geodesic = opts.pop("geodesic", True)
    config = TrainConfig(epochs=epochs, width=width, lr=lr, weight_decay=weight_decay, schedule="cosine",
                         warmup_epochs=1, patches_per_image=patches_per_image, seed=seed, num_threads=threads,
                         max_minutes=max_minutes, offset_start_epoch=round(epochs * 20 / 150),
                         refine_start_epoch=round(epochs * 30 / 150), val_every=max(1, epochs // 10),
                         pseudo=PseudoLabelConfig(geodesic=geodesic), **opts)
    items = load_items(MONUSEG / "images", labels=MONUSEG / "labels", names=s["train"],
                       shift=tuple(shift) if shift[1] > 0 else None, seed=seed)
    val = load_val_items(MONUSEG / "images", MONUSEG / "labels", s["val"])
    t0 = time.monotonic()
    if resume and (outdir / "train" / "train_config.json").exists():
        config = TrainConfig.from_json(json.loads((outdir / "train" / "train_config.json").read_text()))
        config = replace(config, max_minutes=max_minutes)
    train(config, items, outdir, val_items=val, resume=resume, progress=sys.stderr.isatty())
    minutes = json.loads((outdir / "config.json").read_text())["extra"]["train_minutes"]
    epochs_done = json.loads((outdir / "config.json").read_text())["extra"]["epochs_trained"]
    predictor = Predictor(outdir, InferenceConfig())
    test = load_val_items(MONUSEG / "images", MONUSEG / "labels", s["test"])
    scores = [evaluate_image(gt, segment_image(im, predictor).labels) for _, im, gt in test]
    m = mean_scores(scores)
    row = {"config": f"{name}@{tag}" if tag else name, "shift": f"{shift[0]}-{shift[1]}", "seed": seed,
           "train_minutes": minutes,
           "epochs": epochs_done, "object_dice": round(m.object_dice, 4), "aji": round(m.aji, 4),
           "pixel_dice": round(m.pixel_dice, 4), "pq": round(m.pq, 4)}
    per_image = outdir / "test_scores.csv"
    with open(per_image, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "object_dice", "aji", "pixel_dice", "pq"])
        for (n, _, _), sc in zip(test, scores, strict=True):
            w.writerow([n, round(sc.object_dice, 4), round(sc.aji, 4), round(sc.pixel_dice, 4), round(sc.pq, 4)])
    append_row(row)
    click.echo(f"{row}  (total {time.monotonic() - t0:.0f} s)")


def append_row(row: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    new = not RESULTS.exists()
    with open(RESULTS, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerow(row)


@cli.command()
def table() -> None:
    """Print the results CSV beside the paper's Table 1 and Table 2 (MoNuSeg, object Dice / AJI in %)."""
    rows = list(csv.DictReader(open(RESULTS))) if RESULTS.exists() else []
    bands = ["0-0", "2-4", "4-6", "6-8"]
    click.echo("| config | source | " + " | ".join(f"shift {b} obj Dice / AJI" for b in bands) + " |")
    click.echo("|---|---|" + "---|" * len(bands))
    names = list(dict.fromkeys(r["config"] for r in rows))
    order = {c: i for i, c in enumerate(["full", "no_refine", "euclidean", "no_offsets", "baseline_cc", "classical"])}
    names.sort(key=lambda n: (n.split("@")[0] != "full", "@" in n, order.get(n.split("@")[0], 9), n))
    shown_paper = set()
    for name in names:
        ours = {r["shift"]: r for r in rows if r["config"] == name}
        if name == "classical":
            r = ours.get("", next(iter(ours.values())))
            v = f"{100 * float(r['object_dice']):.1f} / {100 * float(r['aji']):.1f}"
            click.echo(f"| classical | ours (no training, same for every band) | {v} | {v} | {v} | {v} |")
            continue
        cells = [f"{100 * float(ours[b]['object_dice']):.1f} / {100 * float(ours[b]['aji']):.1f}"
                 f" ({ours[b]['train_minutes']} min, {ours[b]['epochs']} ep)" if b in ours else "not run"
                 for b in bands]
        click.echo(f"| {name} | ours | " + " | ".join(cells) + " |")
        base = name.split("@")[0]
        paper = PAPER_T2.get(base)
        if paper and base not in shown_paper:
            shown_paper.add(base)
            cells = [f"{paper[b][0]:.1f} / {paper[b][1]:.1f}" for b in bands]
            click.echo(f"| {base} | paper | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    cli()
