"""Train and evaluate one PROnet configuration on MoNuSeg end to end; render the paper's tables.

    python -m benchmarks.monuseg run --config full --shift 0 0 --epochs 60 -o runs/full-s0
    python -m benchmarks.monuseg retune models/pronet-monuseg --tag resumed88   # thresholds incl. min area
    python -m benchmarks.monuseg table

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
from dataclasses import asdict, replace
from pathlib import Path

import click
import numpy as np

from benchmarks import record
from benchmarks.record import banner, smoke_skip

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


SMOKE_PX: int | None = None  # --smoke: one image per split, cropped to this side


@click.group()
@click.option("--smoke", is_flag=True, help="One image per split cropped to 256 px, one epoch of a width-1/16 "
                                            "network; the row goes to a temporary folder (does it run?).")
def cli(smoke: bool) -> None:
    global RESULTS, SMOKE_PX
    if not MONUSEG.exists():
        if smoke:
            smoke_skip(f"{MONUSEG} is absent")
        click.echo(f"MoNuSeg not found at {MONUSEG}; this benchmark needs ../shared/data", err=True)
        sys.exit(2)
    if smoke:
        import tempfile

        SMOKE_PX, RESULTS = 256, Path(tempfile.mkdtemp(prefix="pronet-wsi-smoke-")) / RESULTS.name
    click.echo(banner(seed=None), err=True)


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
    from pronet_wsi.training.inputs import load_items, load_val_items
    from pronet_wsi.training.loop import TrainConfig, train
    from pronet_wsi.training.pseudolabels import PseudoLabelConfig

    s = split()
    if SMOKE_PX:
        epochs, width, s = 1, 0.0625, {k: v[:1] for k, v in s.items()}
    opts = dict(CONFIGS[name])
    geodesic = opts.pop("geodesic", True)
    config = TrainConfig(epochs=epochs, width=width, lr=lr, weight_decay=weight_decay, schedule="cosine",
                         warmup_epochs=1, patches_per_image=patches_per_image, seed=seed, num_threads=threads,
                         max_minutes=max_minutes, offset_start_epoch=round(epochs * 20 / 150),
                         refine_start_epoch=round(epochs * 30 / 150), val_every=max(1, epochs // 10),
                         tune_min_areas_um2=(0.625,),  # as for the recorded rows; `retune` searches the minimum area
                         pseudo=PseudoLabelConfig(geodesic=geodesic), **opts)
    items = load_items(MONUSEG / "images", labels=MONUSEG / "labels", names=s["train"],
                       shift=tuple(shift) if shift[1] > 0 else None, seed=seed)
    val = load_val_items(MONUSEG / "images", MONUSEG / "labels", s["val"])
    if SMOKE_PX:
        items, val = [_crop_item(it) for it in items], [_crop_item(it) for it in val]
    t0 = time.monotonic()
    if resume and (outdir / "train" / "train_config.json").exists():
        config = TrainConfig.from_json(json.loads((outdir / "train" / "train_config.json").read_text()))
        config = replace(config, max_minutes=max_minutes)
    train(config, items, outdir, val_items=val, resume=resume, progress=sys.stderr.isatty())
    score_test(outdir, name, tag, shift, seed, t0)


def score_test(model_dir: Path, name: str, tag: str, shift, seed: int, t0: float) -> None:
    """Score a finished model once on the 14 test images; write its per-image CSV and append the results row."""
    from pronet_wsi.inference import InferenceConfig, Predictor, segment_image
    from pronet_wsi.metrics import evaluate_image, mean_scores
    from pronet_wsi.training.inputs import load_val_items

    extra = json.loads((model_dir / "config.json").read_text())["extra"]
    predictor = Predictor(model_dir, InferenceConfig())
    test = [_crop_item(it) for it in load_val_items(MONUSEG / "images", MONUSEG / "labels",
                                                    split()["test"][: 1 if SMOKE_PX else None])]
    scores = [evaluate_image(gt, segment_image(im, predictor).labels) for _, im, gt in test]
    m = mean_scores(scores)
    row = {"config": f"{name}@{tag}" if tag else name, "shift": f"{shift[0]}-{shift[1]}", "seed": seed,
           "train_minutes": extra["train_minutes"], "epochs": extra["epochs_trained"],
           "object_dice": round(m.object_dice, 4), "aji": round(m.aji, 4),
           "pixel_dice": round(m.pixel_dice, 4), "pq": round(m.pq, 4)}
    per_image = model_dir / "test_scores.csv"
    with open(per_image, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "object_dice", "aji", "pixel_dice", "pq"])
        for (n, _, _), sc in zip(test, scores, strict=True):
            w.writerow([n, round(sc.object_dice, 4), round(sc.aji, 4), round(sc.pixel_dice, 4), round(sc.pq, 4)])
    append_row(row)
    click.echo(f"{row}  (total {time.monotonic() - t0:.0f} s)")


@cli.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--config", "name", type=click.Choice(list(CONFIGS)), default="full")
@click.option("--shift", nargs=2, type=int, default=(0, 0))
@click.option("--seed", default=0)
@click.option("--tag", default="")
@click.option("--min-areas", default="10,20,40,80", help="Minimum areas (px) to try, comma-separated.")
def retune(model_dir, name, shift, seed, tag, min_areas):
    """Re-tune a finished model's thresholds (incl. minimum area) on the validation images, then re-score test.

    Rewrites MODEL_DIR/thresholds.json and appends a results row (the table shows the latest row per config).
    """
    from pronet_wsi.files import atomic_write
    from pronet_wsi.inference import InferenceConfig, Predictor
    from pronet_wsi.training.inputs import load_val_items
    from pronet_wsi.training.loop import tune_thresholds

    t0 = time.monotonic()
    predictor = Predictor(model_dir, InferenceConfig())
    val = load_val_items(MONUSEG / "images", MONUSEG / "labels", split()["val"])
    best = tune_thresholds(predictor, val, predictor.postprocess_config,
                           tuple(int(a) for a in min_areas.split(",")))
    text = json.dumps(asdict(best), indent=2) + "\n"
    atomic_write(model_dir / "thresholds.json", lambda p: p.write_text(text))
    click.echo(f"thresholds: {asdict(best)}")
    score_test(model_dir, name, tag, shift, seed, t0)


def append_row(row: dict) -> None:
    record.append_row(RESULTS, {k: row[k] for k in FIELDS}, seed=row["seed"])


def _crop_item(item: tuple) -> tuple:
    """--smoke: an item (name, image, points or labels, ...) cropped to SMOKE_PX (points outside dropped)."""
    if not SMOKE_PX:
        return item
    name, image, third, *rest = item
    if third.ndim == 2 and third.shape[1] == 2 and third.shape[:1] != image.shape[:1]:  # points (N, 2) x, y
        keep = (third < SMOKE_PX).all(1)
        rest = [r[keep] if isinstance(r, np.ndarray) and len(r) == len(third) else
                ([c for c, k in zip(r, keep, strict=True) if k] if isinstance(r, list) and len(r) == len(third)
                 else r) for r in rest]
        return (name, image[:SMOKE_PX, :SMOKE_PX], third[keep], *rest)
    return (name, image[:SMOKE_PX, :SMOKE_PX], third[:SMOKE_PX, :SMOKE_PX], *rest)


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
        ours = {r["shift"]: r for r in rows if r["config"] == name}  # classical: one row
        if name == "classical":
            r = ours.get("", next(iter(ours.values())))
            v = f"{100 * float(r['object_dice']):.1f} / {100 * float(r['aji']):.1f}"
            click.echo(f"| classical | ours (no training, same for every band) | {v} | {v} | {v} | {v} |")
            continue
        cells = [_cell([r for r in rows if r["config"] == name and r["shift"] == b]) for b in bands]
        click.echo(f"| {name} | ours | " + " | ".join(cells) + " |")
        base = name.split("@")[0]
        paper = PAPER_T2.get(base)
        if paper and base not in shown_paper:
            shown_paper.add(base)
            cells = [f"{paper[b][0]:.1f} / {paper[b][1]:.1f}" for b in bands]
            click.echo(f"| {base} | paper | " + " | ".join(cells) + " |")


def _cell(rows: list[dict]) -> str:
    """One table cell: the latest row per seed; several seeds are averaged, with the AJI range."""
    by_seed = {r["seed"]: r for r in rows}
    if not by_seed:
        return "not run"
    rs = list(by_seed.values())
    od = 100 * sum(float(r["object_dice"]) for r in rs) / len(rs)
    aj = [100 * float(r["aji"]) for r in rs]
    minutes = "/".join(f"{float(r['train_minutes']):.1f}" for r in rs)
    epochs = "/".join(r["epochs"] for r in rs)
    if len(rs) == 1:
        return f"{od:.1f} / {aj[0]:.1f} ({minutes} min, {epochs} ep)"
    return (f"{od:.1f} / {sum(aj) / len(aj):.1f} (mean of {len(rs)} seeds, AJI {min(aj):.1f}-{max(aj):.1f}; "
            f"{minutes} min, {epochs} ep)")


if __name__ == "__main__":
    cli()
