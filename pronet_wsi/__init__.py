"""pronet-wsi: point-supervised nuclei instance segmentation (PROnet) for whole-slide images.

The Python API (names load on first use, so ``import pronet_wsi`` stays light)::

    from pronet_wsi import Predictor, segment_image, segment_slide, train, TrainConfig, evaluate_image
    predictor = Predictor()                       # the shipped model (or Predictor("my-model"))
    seg = segment_image(rgb, predictor, mpp=0.5)  # seg.labels: uint32 instance map
    segment_slide("slide.svs", "out/", predictor) # out/slide.geojson for QuPath
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_WHERE = {
    "segment_slide": "pronet_wsi.wsi.pipeline", "SegmentConfig": "pronet_wsi.wsi.plan",
    "load_model": "pronet_wsi.model", "Predictor": "pronet_wsi.inference", "InferenceConfig": "pronet_wsi.inference",
    "segment_image": "pronet_wsi.inference", "train": "pronet_wsi.training.loop",
    "TrainConfig": "pronet_wsi.training.loop", "evaluate_image": "pronet_wsi.metrics",
    "evaluate_folder": "pronet_wsi.evaluation",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'pronet_wsi' has no attribute {name!r}")
