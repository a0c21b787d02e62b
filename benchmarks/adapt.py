"""New-lab adaptation from a few clicks (issue 12): fine-tune a model that never saw lab X vs train from scratch.

    python -m benchmarks.adapt --lab consep --clicks 200 --init runs/v1-model --minutes 10 -o runs/adapt-c200-init
    python -m benchmarks.adapt --lab consep --clicks 200 --minutes 10 -o runs/adapt-c200-scratch

Clicks are the centroids of every nucleus in whole training images of lab X, images drawn in a fixed order
until about --clicks points; the model is scored once on X's test split (benchmarks/labs.py) and a row is
appended to benchmarks/results/adapt.csv. The start model's own score is the row with --minutes 0.
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import numpy as np

from benchmarks import labs
from benchmarks.record import banner

RESULTS = labs.ROOT / "benchmarks" / "results" / "adapt.csv"


@click.command()
@click.option("--lab", required=True, type=click.Choice(["consep", "emory", "nuinsseg"]))
@click.option("--clicks", default=200)
@click.option("--init", default=None, help="Model folder to fine-tune (none: from scratch).")
@click.option("--minutes", default=10.0, help="Training budget; 0 scores --init as it is.")
@click.option("--threads", default=2)
@click.option("--seed", default=0)
@click.option("--lr", type=float, default=None, help="Override the recipe's learning rate (recipe sweep).")
@click.option("--no-refine", is_flag=True, help="No EM point refinement (recipe sweep).")
@click.option("--tag", default=None, help="Name of the run in the results table (default: the start model's).")
@click.option("-o", "--outdir", required=True, type=click.Path(path_type=Path))
@click.option("--smoke", is_flag=True,
              help="One image per split cropped to 256 px, 20 clicks, the start model scored (no training), the "
                   "row written to a temporary folder (does it run?).")
def main(lab, clicks, init, minutes, threads, seed, lr, no_refine, tag, outdir, smoke) -> None:
    from pronet_wsi.inference import InferenceConfig, Predictor, segment_image
    from pronet_wsi.metrics import evaluate_image, mean_scores
    from pronet_wsi.training.loop import TrainConfig, train

    if smoke:
        labs.smoke()
        clicks, minutes = 20, 0.0
    click.echo(banner(seed))
    items = labs.points_items(labs.load(lab, "train"))
    order = np.random.default_rng(seed).permutation(len(items))
    chosen, n = [], 0
    for i in order:
        if n >= clicks:
            break
        chosen.append(items[i])
        n += len(items[i][2])
    t0 = time.monotonic()
    model_dir = init
    if minutes > 0:
        # epochs sized to the budget so that the schedule (cosine decay; for a from-scratch run the offset and
        # refinement starts) falls inside it: about 60 patches of 256 px a minute on the 2-core machine, with the
        # recipe's own patches per Mpx (8 for a fine-tune, 16 from scratch)
        ppm = TrainConfig.recipe(init=init).patches_per_image
        per_epoch = max(4, sum(max(1, round(ppm * im.shape[0] * im.shape[1] / 1e6)) for _, im, _ in chosen))
        config = TrainConfig.recipe(init=init, max_minutes=minutes, num_threads=threads, tune_thresholds=False,
                                    epochs=max(10, int(minutes * 60 / per_epoch)), seed=seed, lr=lr,
                                    use_refinement=False if no_refine else None)
        model_dir = train(config, chosen, outdir, progress=False)
    train_min = (time.monotonic() - t0) / 60
    predictor = Predictor(model_dir, InferenceConfig())
    m = mean_scores([evaluate_image(gt, segment_image(im, predictor).labels) for _, im, gt in labs.load(lab, "test")])
    row = {"lab": lab, "start": tag or ("scratch" if not init else Path(init).name), "clicks": n, "images": len(chosen),
           "minutes": round(train_min, 1), "aji": round(m.aji, 4), "object_dice": round(m.object_dice, 4),
           "pq": round(m.pq, 4)}
    click.echo(row)
    labs.append_csv(RESULTS, row, seed)


if __name__ == "__main__":
    main()
