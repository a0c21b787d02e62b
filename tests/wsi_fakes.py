"""Test doubles for whole-slide tests: id-coloured synthetic slides and an oracle model that decodes them.

The oracle slide stores each nucleus's id in its pixel colour (R + 256 G, B = 255) in a lossless TIFF, so the
oracle model recovers the ground-truth instances of whatever tile it is asked about and returns their encoded
maps (``encode_maps``): a perfect model for that tile, through the ordinary ``predict_batch`` interface.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pronet_wsi.postprocess import PostprocessConfig
from pronet_wsi.slide import write_pyramid_tiff
from pronet_wsi.synthetic import synthetic_nuclei
from pronet_wsi.training.targets import encode_maps, instance_centroids

BACKGROUND = (235, 200, 225)


def block_labels(shape: tuple[int, int], block: int = 256, per_block: int = 40, seed: int = 0,
                 radius_px: tuple[float, float] = (5.0, 9.0)) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic nuclei drawn block by block (fast for large images); ids unique over the image.

    Returns (image (H, W, 3) uint8 H&E-like, labels (H, W) uint32).
    """
    h, w = shape
    labels = np.zeros(shape, np.uint32)
    image = np.zeros((h, w, 3), np.uint8)
    nid = 0
    k = 0
    for r in range(0, h, block):
        for c in range(0, w, block):
            bh, bw = min(block, h - r), min(block, w - c)
            img, lab, _ = synthetic_nuclei((bh, bw), n_nuclei=per_block, radius_px=radius_px, seed=seed * 1000 + k)
            k += 1
            lab = lab.astype(np.uint32)
            lab[lab > 0] += nid
            nid = max(nid, int(lab.max()))
            labels[r : r + bh, c : c + bw] = lab
            image[r : r + bh, c : c + bw] = img
    return image, labels


def id_colours(labels: np.ndarray) -> np.ndarray:
    """(H, W) ids < 65535 -> (H, W, 3) uint8: background pink, nucleus (id % 256, id // 256, 255)."""
    if labels.max() >= 65535:
        raise ValueError("too many nuclei for the id colour code")
    rgb = np.empty((*labels.shape, 3), np.uint8)
    rgb[:] = BACKGROUND
    fg = labels > 0
    ids = labels[fg].astype(np.int64)
    rgb[fg] = np.stack([ids % 256, ids // 256, np.full_like(ids, 255)], axis=1)
    return rgb


def decode_ids(rgb: np.ndarray) -> np.ndarray:
    """Inverse of :func:`id_colours`; white (outside the slide) is background."""
    r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
    fg = (b == 255) & ~((r == 255) & (g == 255))
    return np.where(fg, r + 256 * g, 0).astype(np.uint32)


def write_oracle_slide(path: Path, labels: np.ndarray, mpp: float = 0.25, tile_px: int = 128) -> Path:
    write_pyramid_tiff(path, id_colours(labels), mpp, tile_px=tile_px, compression="zlib", levels=2)
    return path


def relabel(labels: np.ndarray) -> np.ndarray:
    """Consecutive ids 1..N (in order of the original ids); 0 stays background."""
    uniq, inv = np.unique(labels, return_inverse=True)
    inv = inv.reshape(labels.shape).astype(np.uint32)
    return inv if uniq[0] == 0 else inv + 1


class OracleModel:
    """A perfect model for id-coloured slides: returns ``encode_maps`` of the ids it reads in each tile."""

    name = "oracle"

    def __init__(self, mpp: float = 0.25, radius_px: float = 8.0) -> None:
        self.mpp = mpp
        self.radius_px = radius_px
        self.postprocess_config = PostprocessConfig()
        self.context_px = 32
        self.calls = 0
        self.tiles_seen = 0

    def maps(self, rgb: np.ndarray) -> dict[str, np.ndarray]:
        """Oracle maps of one (H, W, 3) image."""
        ids = decode_ids(rgb)
        compact = relabel(ids)
        centers = instance_centroids(compact)
        return encode_maps(compact, centers, self.radius_px)

    def predict_batch(self, tiles: np.ndarray) -> dict[str, np.ndarray]:
        self.calls += 1
        self.tiles_seen += len(tiles)
        per = [self.maps(t) for t in tiles]
        return {k: np.stack([p[k] for p in per]) for k in ("foreground", "offsets", "centers")}


def check_qupath_geojson(fc: dict, shape_hw: tuple[int, int] | None = None,
                         classes: tuple[str, ...] = ("Nucleus",), cells: bool = False) -> int:
    """Assert the QuPath import rules (research/peer-tools.md section 3) on a read-back FeatureCollection.

    One FeatureCollection; each feature has a UUID id, ``properties.objectType == "detection"`` (not at the top
    level), ``classification {name, color [r, g, b]}``, a measurements map of finite numbers, and a valid closed
    Polygon (>= 4 points, one ring, coordinates on the 0.01 grid, inside the slide when ``shape_hw`` is given).
    ``classes``: the allowed class names (a typed model's nuclei also carry ``Class probability``). Returns the
    number of features. The measurements beyond the four every nucleus has are QuPath's (``measurements.py``).
    ``cells``: every feature is a QuPath cell (``objectType: "cell"``, ``geometry`` the cell, a valid
    ``nucleusGeometry`` inside it).
    """
    import math
    import uuid

    import shapely

    from pronet_wsi.measurements import measurement_names

    assert fc["type"] == "FeatureCollection" and isinstance(fc["features"], list)
    pairs: list = []  # (nucleus, cell)
    for f in fc["features"]:
        assert f["type"] == "Feature" and "objectType" not in f
        uuid.UUID(f["id"])
        props = f["properties"]
        assert props["objectType"] == ("cell" if cells else "detection")
        cls = props["classification"]
        assert set(cls) == {"name", "color"} and cls["name"] in classes
        assert len(cls["color"]) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in cls["color"])
        meas = props["measurements"]
        typed = {"Class probability"} if classes != ("Nucleus",) else set()
        base = {"Area µm^2", "Area px^2", "Center score", "Foreground probability", *typed}
        assert base <= set(meas) <= base | set(measurement_names("all", cells))
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in meas.values())
        geom = f["geometry"]
        assert geom["type"] == "Polygon" and len(geom["coordinates"]) == 1
        ring = np.asarray(geom["coordinates"][0], float)
        assert len(ring) >= 4 and (ring[0] == ring[-1]).all()
        assert np.allclose(ring, np.round(ring, 2), atol=1e-9)
        poly = shapely.Polygon(ring)
        assert poly.is_valid and poly.area > 0
        if cells:
            nuc = f["nucleusGeometry"]
            assert nuc["type"] == "Polygon" and len(nuc["coordinates"]) == 1
            nucleus = shapely.Polygon(nuc["coordinates"][0])
            assert nucleus.is_valid and nucleus.area > 0
            pairs.append((nucleus, poly))
        else:
            assert "nucleusGeometry" not in f
        if shape_hw is not None:
            assert ring.min() >= 0 and (ring[:, 0] <= shape_hw[1]).all() and (ring[:, 1] <= shape_hw[0]).all()
    if pairs:  # each nucleus inside its cell, but for 0.01 px rounding and where it overlaps another nucleus
        nuclei = np.array([n for n, _ in pairs])
        tree = shapely.STRtree(nuclei)
        for k, (nucleus, cell) in enumerate(pairs):
            outside = nucleus.difference(cell)
            if outside.area > 0.05:
                others = [j for j in tree.query(nucleus, predicate="intersects") if j != k]
                assert outside.difference(shapely.union_all(nuclei[others])).area <= 0.05, k
    return len(fc["features"])


class TypedOracleModel(OracleModel):
    """:class:`OracleModel` with a type head: a nucleus with an even id is ``Even``, an odd one ``Odd``."""

    name = "typed-oracle"
    classes = ("Even", "Odd")
    class_colors = ((10, 20, 30), (200, 100, 0))

    def maps(self, rgb: np.ndarray) -> dict[str, np.ndarray]:
        ids = decode_ids(rgb)
        maps = super().maps(rgb)
        odd = (ids % 2 == 1).astype(np.float32)
        maps["types"] = np.stack([1.0 - 0.9 * odd - 0.05, 0.9 * odd + 0.05])  # (2, H, W), rows sum to 1
        return maps

    def predict_batch(self, tiles: np.ndarray) -> dict[str, np.ndarray]:
        self.calls += 1
        self.tiles_seen += len(tiles)
        per = [self.maps(t) for t in tiles]
        return {k: np.stack([p[k] for p in per]) for k in per[0]}


class DarkBlobModel:
    """A model that calls every dark connected blob a nucleus (works at any resolution; for scale tests)."""

    name = "dark-blobs"

    def __init__(self, mpp: float) -> None:
        self.mpp = mpp
        self.postprocess_config = PostprocessConfig(min_area_px=3)
        self.context_px = 16

    def predict_batch(self, tiles: np.ndarray) -> dict[str, np.ndarray]:
        from scipy import ndimage as ndi

        per = []
        for t in tiles:
            lab, _ = ndi.label(t.mean(axis=2) < 128)
            per.append(encode_maps(lab.astype(np.uint32), radius_px=4))
        return {k: np.stack([p[k] for p in per]) for k in ("foreground", "offsets", "centers")}


def blob_slide(path: Path, shape: tuple[int, int], centers_xy: np.ndarray, radius: float, mpp: float) -> Path:
    """A slide with dark disks of ``radius`` level-0 px at ``centers_xy`` on a pink background."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    img = np.empty((h, w, 3), np.uint8)
    img[:] = (230, 190, 215)
    for x, y in centers_xy:
        img[(xx - x) ** 2 + (yy - y) ** 2 <= radius**2] = (60, 30, 100)
    write_pyramid_tiff(path, img, mpp, tile_px=128, levels=3, compression="zlib")
    return path


def tiny_model_dir(path: Path, mpp: float = 2.0) -> Path:
    """A tiny random PRONet model folder (width 1/16) whose head biases make it call some nuclei."""
    import torch

    from pronet_wsi.model import ModelConfig, PRONet, save_model

    torch.manual_seed(0)
    net = PRONet(ModelConfig(width=0.0625, mpp=mpp)).eval()
    with torch.no_grad():
        net.head_center.bias.fill_(-0.5)
        net.head_binary.bias.fill_(0.5)
    return save_model(net, path)


def small_slide(path: Path, seed: int = 0, side: int = 384, mpp: float = 0.5) -> Path:
    """A small pyramidal TIFF of pink tissue with dark specks (fast to segment with :func:`tiny_model_dir`)."""
    rng = np.random.default_rng(seed)
    img = np.full((side, side, 3), (230, 180, 210), np.uint8)
    img[rng.random((side, side)) < 0.05] = (80, 40, 120)
    write_pyramid_tiff(path, img, mpp, tile_px=128, compression="zlib")
    return path


def cli_run(*args):
    """``pronet-wsi ARGS`` in-process (arguments str()-ed); the click Result."""
    from click.testing import CliRunner

    from pronet_wsi.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(res) -> str:
    """The CLI failed with exactly one non-empty line of output and no traceback; returns that line."""
    assert res.exit_code not in (0, None), res.output
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit), repr(res.exception)
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1, res.output
    assert "Traceback" not in res.output
    return lines[0]
