"""Training targets from instances and points: the Gaussian centre heatmap C and the offset field O.

This is the encoder whose decoder is :mod:`pronet_wsi.postprocess`; ``postprocess(encode_maps(labels))``
gives back ``labels`` (round-trip test).
"""

from __future__ import annotations

import numpy as np

from pronet_wsi.postprocess import instance_centroids_rc as instance_centroids


def gaussian_sigma(radius_px: float) -> float:
    """CenterNet's sigma for a Gaussian of radius r: diameter / 6."""
    return (2.0 * radius_px + 1.0) / 6.0


def center_heatmap(centers_rc: np.ndarray, shape: tuple[int, int], radius_px: float = 8.0) -> np.ndarray:
    """Gaussian centre heatmap.

    Parameters
    ----------
    centers_rc : (N, 2) float, (row, col) centres in the array frame; rounded to the nearest pixel.
    shape : (H, W) of the output.
    radius_px : Gaussian radius r (paper: 8 on MoNuSeg); the kernel is truncated at r.

    Returns
    -------
    (H, W) float32 in [0, 1], exactly 1 at each (rounded) centre, element-wise max where Gaussians overlap.
    """
    h, w = shape
    heat = np.zeros(shape, np.float32)
    r = int(np.ceil(radius_px))
    sigma = gaussian_sigma(radius_px)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    kernel = np.exp(-(yy**2 + xx**2) / (2 * sigma**2)).astype(np.float32)
    for rc in np.rint(np.asarray(centers_rc, float).reshape(-1, 2)).astype(np.int64):
        r0, c0 = rc
        if not (0 <= r0 < h and 0 <= c0 < w):
            continue
        top, left = max(r0 - r, 0), max(c0 - r, 0)
        bottom, right = min(r0 + r + 1, h), min(c0 + r + 1, w)
        patch = kernel[top - (r0 - r) : bottom - (r0 - r), left - (c0 - r) : right - (c0 - r)]
        np.maximum(heat[top:bottom, left:right], patch, out=heat[top:bottom, left:right])
    return heat


def offset_field(labels: np.ndarray, centers_rc: np.ndarray) -> np.ndarray:
    """Offset from each instance pixel to its centre.

    Parameters
    ----------
    labels : (H, W) int, 0 = background, id i (1-based) belongs to ``centers_rc[i - 1]``.
    centers_rc : (N, 2) float, (row, col) centres in the array frame.

    Returns
    -------
    (2, H, W) float32, (dy, dx) in px pointing from each pixel to its nucleus centre; 0 on background.
    """
    labels = np.asarray(labels)
    centers_rc = np.asarray(centers_rc, np.float64).reshape(-1, 2)
    out = np.zeros((2, *labels.shape), np.float32)
    rows, cols = np.nonzero(labels)
    ids = labels[rows, cols].astype(np.int64) - 1
    if ids.size and ids.max() >= len(centers_rc):
        raise ValueError(f"labels hold id {ids.max() + 1} but only {len(centers_rc)} centres were given")
    out[0, rows, cols] = centers_rc[ids, 0] - rows
    out[1, rows, cols] = centers_rc[ids, 1] - cols
    return out


def encode_maps(
    labels: np.ndarray, centers_rc: np.ndarray | None = None, radius_px: float = 8.0
) -> dict[str, np.ndarray]:
    """Oracle maps for an instance map: what a perfect model would predict.

    Returns ``foreground`` (H, W) float32 in {0, 1}, ``offsets`` (2, H, W) float32 (dy, dx) px,
    ``centers`` (H, W) float32 heatmap. Centres default to the instance centroids.
    """
    labels = np.asarray(labels)
    if centers_rc is None:
        centers_rc = instance_centroids(labels)
    centers_rc = np.asarray(centers_rc, float).reshape(-1, 2)
    present = ~np.isnan(centers_rc).any(axis=1)
    safe = np.where(present[:, None], centers_rc, 0.0)
    return {
        "foreground": (labels > 0).astype(np.float32),
        "offsets": offset_field(labels, safe),
        "centers": center_heatmap(centers_rc[present], labels.shape, radius_px),
    }
