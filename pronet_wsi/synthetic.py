"""Synthetic H&E-like images with disk/ellipse nuclei of known centres.

Used by tests, examples and benchmarks so that nothing needs downloaded data.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def synthetic_nuclei(
    shape: tuple[int, int] = (256, 256),
    n_nuclei: int = 40,
    radius_px: tuple[float, float] = (5.0, 9.0),
    seed: int = 0,
    min_separation_px: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw elliptical nuclei on a pink background.

    Returns
    -------
    image : (H, W, 3) uint8 RGB, purple nuclei on pink stroma with noise.
    labels : (H, W) uint32 instance map, 0 = background, ids 1..N in drawing order.
    centers_rc : (N, 2) float64 (row, col) centroids of the drawn instances.
    """
    rng = np.random.default_rng(seed)
    h, w = shape
    labels = np.zeros(shape, np.uint32)
    rr, cc = np.mgrid[0:h, 0:w]
    sep = min_separation_px if min_separation_px is not None else 1.6 * radius_px[0]
    placed: list[tuple[float, float]] = []
    nid = 0
    for _ in range(n_nuclei * 20):
        if nid >= n_nuclei:
            break
        r0, c0 = rng.uniform(0, h), rng.uniform(0, w)
        if any((r0 - a) ** 2 + (c0 - b) ** 2 < sep**2 for a, b in placed):
            continue
        ra, rb = rng.uniform(*radius_px), rng.uniform(*radius_px)
        th = rng.uniform(0, np.pi)
        dr, dc = rr - r0, cc - c0
        u = dr * np.cos(th) + dc * np.sin(th)
        v = -dr * np.sin(th) + dc * np.cos(th)
        disk = (u / ra) ** 2 + (v / rb) ** 2 <= 1.0
        disk &= labels == 0
        if disk.sum() < 12:
            continue
        nid += 1
        labels[disk] = nid
        placed.append((r0, c0))
    if nid:
        centers_rc = np.array(ndi.center_of_mass(labels > 0, labels, np.arange(1, nid + 1)), float)
    else:
        centers_rc = np.zeros((0, 2), float)
    background = np.array([235, 180, 210], float)
    nucleus = np.array([90, 50, 140], float)
    fg = (labels > 0).astype(float)
    fg = ndi.gaussian_filter(fg, 0.8)
    img = background[None, None] * (1 - fg[..., None]) + nucleus[None, None] * fg[..., None]
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), labels, centers_rc.reshape(-1, 2)


TYPED_LOOKS = {"Dark": (60, 25, 110), "Pale": (160, 120, 200)}


def synthetic_typed_nuclei(shape: tuple[int, int] = (256, 256), n_nuclei: int = 40, seed: int = 0
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """:func:`synthetic_nuclei` whose nuclei have one of two looks, the class following the look.

    Returns image, labels and centers_rc as :func:`synthetic_nuclei`, and the class name of each instance
    (``Dark``: small dark nuclei; ``Pale``: pale ones; see :data:`TYPED_LOOKS`).
    """
    rng = np.random.default_rng(seed + 7919)
    _, labels, centers_rc = synthetic_nuclei(shape, n_nuclei, seed=seed)
    names = list(TYPED_LOOKS)
    types = [names[int(k)] for k in rng.integers(0, len(names), len(centers_rc))]
    colour = np.array([[235, 180, 210], *[TYPED_LOOKS[t] for t in types]], float)  # row 0: background
    img = colour[labels]
    for c in range(3):
        img[..., c] = ndi.gaussian_filter(img[..., c], 0.8)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), labels, centers_rc, types
