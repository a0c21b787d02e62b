#!/usr/bin/env bash
# The adaptation loop of the README ("Adapting the model to your lab") on a generated slide, end to end:
# segment -> suggest -> (a pathologist corrects the points in the boxes) -> train --init -> segment -m.
# The pathologist is played by the generator's true nucleus centres. About 6 minutes on 2 CPU cores.
#
#   bash examples/adapt_loop.sh [WORKDIR]        # default: adapt_demo/
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=${1:-adapt_demo}
py=${PYTHON:-python}
mkdir -p "$work"

# a 2048 px slide at 0.25 um/px, with its true nucleus centres beside it
$py "$here/make_demo_slide.py" "$work/slide.tif" --seed 3 --truth "$work/truth.geojson"

pronet-wsi segment "$work/slide.tif" -o "$work/before"
pronet-wsi suggest "$work/slide.tif" -o "$work/suggest" --boxes 6 --box-um 64

# QuPath step (README steps 2-4): import suggest/slide_suggest.geojson, click every nucleus in each box, export.
# Here: each box's pre-filled points are replaced by the true centres inside it; the boxes stay (complete regions).
$py - "$work" <<'PY'
import json, sys
from pathlib import Path

import numpy as np
import shapely

from pronet_wsi.training.points import read_points

work = Path(sys.argv[1])
fc = json.loads((work / "suggest" / "slide_suggest.geojson").read_text())
truth = read_points(work / "truth.geojson")
boxes = [f for f in fc["features"] if f["geometry"]["type"] == "Polygon"]
inside = np.zeros(len(truth), bool)
for b in boxes:
    inside |= shapely.contains_xy(shapely.geometry.shape(b["geometry"]), truth[:, 0], truth[:, 1])
points = {"type": "Feature", "properties": {"objectType": "annotation", "classification": {"name": "Nucleus"}},
          "geometry": {"type": "MultiPoint", "coordinates": truth[inside].tolist()}}
(work / "points.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": boxes + [points]}))
print(f"{len(boxes)} boxes, {int(inside.sum())} clicks -> {work / 'points.geojson'}")
PY

pronet-wsi train --init default --slide "$work/slide.tif" --points "$work/points.geojson" -o "$work/my-lab-model" \
    --max-minutes 3 --quiet
pronet-wsi segment "$work/slide.tif" -m "$work/my-lab-model" -o "$work/after"
echo "before: $work/before/slide.geojson  after: $work/after/slide.geojson  (import either in QuPath over slide.tif)"
