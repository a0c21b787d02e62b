"""pronet-wsi: point-supervised nuclei instance segmentation (PROnet) for whole-slide images."""

__version__ = "0.1.0"
