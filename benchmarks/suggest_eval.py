"""Do `suggest` boxes find where the model is wrong? AJI inside suggested boxes vs inside random tissue boxes.

    python -m benchmarks.suggest_eval -m models/pronet-multilab --dataset emory --split test

Each image of the split is written as a small pyramidal TIFF at the model's mpp and run through
`suggest_slide` (boxes of --region-um); the model's full-image segmentation is then scored against the
ground truth inside each suggested box and inside as many boxes drawn at random from the same candidates.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
import numpy as np

from benchmarks import labs
from benchmarks.record import banner


@click.command()
@click.option("-m", "--model", "model_dir", default=None)
@click.option("--dataset", default="monuseg", type=click.Choice(list(labs.LABS)))
@click.option("--split", default="test")
@click.option("--region-um", default=40.0)
@click.option("--regions", default=2, help="Suggested boxes per image.")
@click.option("--seed", default=0)
@click.option("--smoke", is_flag=True, help="One image cropped to 256 px, one 20 um box (does it run?).")
def main(model_dir, dataset, split, region_um, regions, seed, smoke) -> None:
    from pronet_wsi.inference import InferenceConfig, Predictor, segment_image
    from pronet_wsi.metrics import evaluate_image
    from pronet_wsi.slide import open_slide, write_pyramid_tiff
    from pronet_wsi.suggest import SuggestConfig, candidate_centres
    from pronet_wsi.tissue import tissue_mask
    from pronet_wsi.wsi.pipeline import suggest_slide

    if smoke:
        labs.smoke()
        regions, region_um = 1, 20.0
    click.echo(banner(seed))
    predictor = Predictor(model_dir, InferenceConfig())
    rng = np.random.default_rng(seed)
    config = SuggestConfig(regions=regions, region_um=region_um, candidates=max(16, 4 * regions), groups=1,
                           min_gap=1.0)
    sugg, rand = [], []
    side = int(round(region_um / labs.MODEL_MPP))
    with tempfile.TemporaryDirectory() as tmp:
        for name, image, gt in labs.load(dataset, split):
            if min(image.shape[:2]) < 2 * side:
                continue
            path = Path(tmp) / f"{name}.tif"
            write_pyramid_tiff(path, image, labs.MODEL_MPP, tile_px=256, levels=1, compression="zlib")
            import json

            out = Path(tmp) / f"{name}.geojson"
            suggest_slide(path, out, predictor, config)
            pred = segment_image(image, predictor).labels
            boxes = [f["geometry"]["coordinates"][0][0] for f in json.loads(out.read_text())["features"]
                     if f["geometry"]["type"] == "Polygon"]
            with open_slide(path) as slide:
                thumb, ds = slide.thumbnail(2048)
            cands = candidate_centres(tissue_mask(thumb, ds * labs.MODEL_MPP), ds, config.candidates)
            picks = rng.choice(len(cands), size=min(len(boxes), len(cands)), replace=False)
            rand_boxes = [(cx - side / 2, cy - side / 2) for cx, cy in cands[picks]]
            for store, corners in ((sugg, boxes), (rand, rand_boxes)):
                for x0, y0 in corners:
                    r0 = int(np.clip(round(y0), 0, image.shape[0] - side))
                    c0 = int(np.clip(round(x0), 0, image.shape[1] - side))
                    g, p = gt[r0:r0 + side, c0:c0 + side], pred[r0:r0 + side, c0:c0 + side]
                    if g.any():
                        store.append(evaluate_image(g, p).aji)
    click.echo(f"| {dataset} {split} | {len(sugg)} suggested boxes: AJI {np.mean(sugg):.3f} | {len(rand)} random "
               f"boxes: AJI {np.mean(rand):.3f} | difference {np.mean(rand) - np.mean(sugg):+.3f} |")


if __name__ == "__main__":
    main()
