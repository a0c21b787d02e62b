"""Training items -> samples (pseudo labels) -> augmented training patches with PROnet's targets.

Items come from :mod:`pronet_wsi.training.inputs`. Pseudo labels (V, K and the Voronoi cells) are computed once
per image and cached on disk. Points and the predicted mask change during training (EM refinement, offset
targets), so they live on the samples.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi

from pronet_wsi.errors import InputError
from pronet_wsi.geometry import xy_to_index
from pronet_wsi.training.pseudolabels import PseudoLabelConfig, pseudo_labels_with_cells
from pronet_wsi.training.targets import center_heatmap, offset_field


@dataclass(frozen=True)
class AugmentConfig:
    """Random crop (always), flips + 90-degree rotations, random rescale, colour and stain jitter, 20x blur.

    hed_scale, hed_shift : per-patch stain jitter in hematoxylin-eosin-DAB optical density (each channel
        multiplied by 1 +- hed_scale and shifted by +- hed_shift), the variation between labs and scanners.
    lowres_prob, lowres_range : with this probability the patch is shrunk by a factor in the range and
        enlarged back, which is what a 20x (0.5 um/px) slide looks like once resampled to a 40x model.
    """

    dihedral: bool = True
    scale_range: tuple[float, float] = (0.8, 1.25)
    gain: float = 0.08
    bias: float = 10.0
    hue_jitter: bool = True
    hed_scale: float = 0.05
    hed_shift: float = 0.01
    lowres_prob: float = 0.3
    lowres_range: tuple[float, float] = (1.6, 2.4)

    def __post_init__(self) -> None:
        lo, hi = self.scale_range
        if not 0.25 <= lo <= hi <= 4.0:
            raise InputError(f"scale_range={self.scale_range}: need 0.25 <= min <= max <= 4")
        if not 0.0 <= self.lowres_prob <= 1.0:
            raise InputError(f"lowres_prob={self.lowres_prob}: must be in [0, 1]")
        if not 1.0 <= self.lowres_range[0] <= self.lowres_range[1] <= 8.0:
            raise InputError(f"lowres_range={self.lowres_range}: need 1 <= min <= max <= 8")
        if not (0.0 <= self.hed_scale < 1.0 and self.hed_shift >= 0.0):
            raise InputError(f"hed_scale={self.hed_scale}, hed_shift={self.hed_shift}: need 0 <= scale < 1, shift >= 0")


@dataclass
class Sample:
    """One training image and everything derived from it (arrays in the image frame).

    image : (H, W, 3) uint8. points_xy : (N, 2) float64 current (refined) points in the array-index frame
    (pixel ``[r, c]`` centred at ``(c, r)``), the frame of the pseudo labels, targets and refinement.
    voronoi, cluster : (H, W) uint8 pseudo labels (0 bg, 1 fg, 2 ignore).
    cells : (H, W) int32 Voronoi cell index into ``points_xy`` (-1 none).
    pred_mask : (H, W) bool predicted foreground (None until offsets are switched on).
    region : (H, W) bool, where every nucleus is clicked (None: the whole image). Outside it the pseudo labels
        are ignore and the cells -1, so no loss sees those pixels, and patches are centred inside it.
    point_classes : (N,) int16 class index of each point into the run's classes, -1 = untyped (None: all).
    """

    name: str
    image: np.ndarray
    points_xy: np.ndarray
    voronoi: np.ndarray
    cluster: np.ndarray
    cells: np.ndarray
    initial_points_xy: np.ndarray = field(default=None)  # type: ignore[arg-type]  # set in __post_init__
    pred_mask: np.ndarray | None = None
    region: np.ndarray | None = None
    point_classes: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.initial_points_xy is None:
            self.initial_points_xy = self.points_xy.copy()
        if self.point_classes is None:
            self.point_classes = np.full(len(self.points_xy), -1, np.int16)

    @classmethod
    def in_region(cls, name: str, image: np.ndarray, points_xy: np.ndarray, voronoi: np.ndarray,
                  cluster: np.ndarray, cells: np.ndarray, region: np.ndarray | None = None, **kw) -> Sample:
        """A Sample whose pseudo labels are ignore (2) and cells -1 outside ``region`` (new arrays; None: as
        given), so no loss sees the pixels where the clicks are not complete."""
        if region is not None:
            voronoi = np.where(region, voronoi, 2).astype(np.uint8)
            cluster = np.where(region, cluster, 2).astype(np.uint8)
            cells = np.where(region, cells, -1).astype(np.int32)
        return cls(name, image, points_xy, voronoi, cluster, cells, region=region, **kw)


def prepare_samples(items: list[tuple], config: PseudoLabelConfig, cache_dir: Path | None,
                    classes: tuple[str, ...] = ()) -> list[Sample]:
    """Pseudo labels for each item, cached in ``cache_dir`` keyed by image, points and config.

    An item is (name, image, points_xy[, region[, point classes]]): points in the continuous frame of point
    files (converted here, once, to the array frame of :class:`Sample`), ``region`` an (H, W) bool mask of where
    the clicks are complete (None: the whole image), point classes a name per point ("" = untyped), indexed
    into ``classes``.
    """
    samples = []
    for name, image, pts_xy, *rest in items:
        pts = xy_to_index(pts_xy)
        key = hashlib.sha1(image.tobytes()[:1_000_000] + pts.tobytes() +
                           json.dumps(asdict(config), sort_keys=True).encode()).hexdigest()[:16]
        cache = None if cache_dir is None else Path(cache_dir) / f"{name}_{key}.npz"
        if cache is not None and cache.exists():
            z = np.load(cache)
            v, k, cells = z["voronoi"], z["cluster"], z["cells"]
        else:
            v, k, cells = pseudo_labels_with_cells(image, pts, config)
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_suffix(".tmp.npz")
                np.savez_compressed(tmp, voronoi=v, cluster=k, cells=cells)
                tmp.replace(cache)
        region = rest[0] if rest else None
        names = rest[1] if len(rest) > 1 and rest[1] is not None else [""] * len(pts)
        index = {c: i for i, c in enumerate(classes)}
        point_classes = np.array([index.get(c, -1) for c in names], np.int16)
        samples.append(Sample.in_region(name, image, pts.astype(np.float64), v, k, cells.astype(np.int32), region,
                                        point_classes=point_classes))
    return samples


def channel_stats(samples: list[Sample]) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and std of the training images scaled to [0, 1]."""
    px = np.concatenate([s.image.reshape(-1, 3)[::7] for s in samples]).astype(np.float64) / 255.0
    m, s = px.mean(0).round(4).tolist(), np.maximum(px.std(0), 1e-3).round(4).tolist()
    return (m[0], m[1], m[2]), (s[0], s[1], s[2])


class PatchDataset(torch.utils.data.Dataset):
    """Random augmented patches; item ``i`` of epoch ``e`` is a pure function of (seed, e, i).

    An epoch has at least ``min_patches`` items (the images cycled), so that a few small clicked crops still
    make one full batch.
    """

    def __init__(self, samples: list[Sample], patch_px: int, patches_per_image: int, radius_px: float,
                 mean: tuple[float, ...], std: tuple[float, ...], augment: AugmentConfig = AugmentConfig(),
                 seed: int = 0, by_area: bool = False, min_patches: int = 1) -> None:
        self.samples, self.patch_px = samples, patch_px
        if by_area:
            counts = [max(1, round(patches_per_image * s.image.shape[0] * s.image.shape[1] / 1e6)) for s in samples]
            index = np.repeat(np.arange(len(samples)), counts)
        else:
            index = np.tile(np.arange(len(samples)), patches_per_image)
        self.index = np.resize(index, max(len(index), min_patches))
        self.radius_px, self.augment, self.seed = radius_px, augment, seed
        self.mean = np.asarray(mean, np.float32) * 255
        self.std = np.asarray(std, np.float32) * 255
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, i])
        s = self.samples[self.index[i]]
        return make_patch(s, rng, self.patch_px, self.radius_px, self.augment, self.mean, self.std)


def make_patch(s: Sample, rng: np.random.Generator, patch_px: int, radius_px: float, aug: AugmentConfig,
               mean: np.ndarray, std: np.ndarray) -> dict[str, torch.Tensor]:
    """Crop, rescale, rotate/flip, jitter; then compute the heatmap and offset targets in the patch frame."""
    h, w = s.image.shape[:2]
    scale = float(np.exp(rng.uniform(*np.log(aug.scale_range))))
    crop = int(round(patch_px / scale))
    if s.region is not None:  # centred on a random pixel of the region, kept inside the image
        rr, cc = np.nonzero(s.region)
        j = int(rng.integers(len(rr)))
        r0 = int(np.clip(rr[j] - crop // 2, 0, max(h - crop, 0)))
        c0 = int(np.clip(cc[j] - crop // 2, 0, max(w - crop, 0)))
    else:
        r0 = int(rng.integers(0, max(h - crop, 0) + 1))
        c0 = int(rng.integers(0, max(w - crop, 0) + 1))
    sl = (slice(r0, r0 + crop), slice(c0, c0 + crop))
    pred = s.pred_mask[sl] if s.pred_mask is not None else np.zeros((min(crop, h - r0), min(crop, w - c0)), bool)
    valid = s.region[sl] if s.region is not None else np.ones(pred.shape, bool)
    layers = [s.image[sl], s.voronoi[sl], s.cluster[sl], s.cells[sl], pred, valid]
    ch, cw = layers[1].shape
    if (ch, cw) != (crop, crop):  # image smaller than the crop: pad, labels ignore
        pads = ((0, crop - ch), (0, crop - cw))
        layers = [np.pad(layers[0], (*pads, (0, 0)), mode="reflect"), np.pad(layers[1], pads, constant_values=2),
                  np.pad(layers[2], pads, constant_values=2), np.pad(layers[3], pads, constant_values=-1),
                  np.pad(layers[4], pads), np.pad(layers[5], pads)]
    zoom = patch_px / crop
    img = _resize(layers[0], patch_px, order=1)
    voronoi, cluster, cells, pred, valid = (_resize(a, patch_px, order=0) for a in layers[1:])
    pts_rc = (s.points_xy[:, ::-1] - [r0, c0] + 0.5) * zoom - 0.5
    if aug.dihedral:
        k, flip = int(rng.integers(4)), bool(rng.integers(2))
        img, voronoi, cluster, cells, pred, valid = (_dihedral(a, k, flip)
                                                     for a in (img, voronoi, cluster, cells, pred, valid))
        pts_rc = _dihedral_points(pts_rc, k, flip, patch_px)
    img = jitter_colour(img, rng, aug)
    img = ((img - mean) / std).astype(np.float32)
    inside = (pts_rc >= -0.5).all(1) & (pts_rc < patch_px - 0.5).all(1)
    heat = center_heatmap(pts_rc[inside], (patch_px, patch_px), radius_px)
    types = type_target(cells, cluster, voronoi, pred, s.point_classes, valid)
    mask = pred & (cells >= 0)
    offsets = offset_field(np.where(mask, cells + 1, 0), pts_rc)  # to the (refined) point of each pixel's cell
    return {
        "image": torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))),
        "voronoi": torch.from_numpy(np.ascontiguousarray(voronoi)),
        "cluster": torch.from_numpy(np.ascontiguousarray(cluster)),
        "heatmap": torch.from_numpy(heat),
        "offsets": torch.from_numpy(offsets),
        "offset_mask": torch.from_numpy(np.ascontiguousarray(mask)),
        "valid": torch.from_numpy(np.ascontiguousarray(valid)),
        "types": torch.from_numpy(types),
    }


def type_target(cells: np.ndarray, cluster: np.ndarray, voronoi: np.ndarray, pred_mask: np.ndarray,
                point_classes: np.ndarray | None, valid: np.ndarray | None = None) -> np.ndarray:
    """(H, W) int64 class target: a typed point's class over its nucleus as far as known (its Voronoi cell where
    K, V or the current predicted mask is foreground), -2 where the pseudo labels and the mask say background
    (K or V background, not predicted foreground, inside the annotated region), -1 (ignore) elsewhere and for
    untyped points. The type loss ignores -2 unless ``LossConfig.type_background`` weighs it.

    The predicted mask matters for nuclei that k-means puts in the background (pale, vesicular ones): with K
    and V alone such a class is taught on the point's small disk only, and the head learns the dark classes.
    """
    out = np.full(cells.shape, -1, np.int64)
    if point_classes is None or not (point_classes >= 0).any():
        return out
    pred = pred_mask.astype(bool)
    fg = (cells >= 0) & ((cluster == 1) | (voronoi == 1) | pred)
    background = ~fg & ~pred & ((cluster == 0) | (voronoi == 0))
    if valid is not None:
        background &= valid.astype(bool)
    out[background] = -2
    rr, cc = np.nonzero(fg)
    out[rr, cc] = point_classes[cells[rr, cc]]
    return out


def jitter_colour(img: np.ndarray, rng: np.random.Generator, aug: AugmentConfig) -> np.ndarray:
    """Stain (HED), gain/bias and 20x-blur jitter of an RGB uint8 patch -> float32 0-255; geometry unchanged."""
    out = img.astype(np.float32)
    if aug.hed_scale or aug.hed_shift:
        from skimage.color import hed2rgb, rgb2hed

        hed = rgb2hed(img)
        hed = hed * (1 + rng.uniform(-aug.hed_scale, aug.hed_scale, 3)) + rng.uniform(-aug.hed_shift,
                                                                                      aug.hed_shift, 3)
        out = (hed2rgb(hed) * 255).astype(np.float32)
    out = np.clip(out * (1 + rng.uniform(-aug.gain, aug.gain, 3)) + rng.uniform(-aug.bias, aug.bias, 3),
                  0, 255).astype(np.float32)
    if aug.lowres_prob and rng.random() < aug.lowres_prob:
        f = float(rng.uniform(*aug.lowres_range))
        t = torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))[None]
        small = torch.nn.functional.interpolate(t, scale_factor=1 / f, mode="bilinear", antialias=True)
        out = torch.nn.functional.interpolate(small, size=out.shape[:2], mode="bilinear")[0].numpy()
        out = np.ascontiguousarray(out.transpose(1, 2, 0))
    return out


def _resize(a: np.ndarray, size: int, order: int) -> np.ndarray:
    if a.shape[0] == size and a.shape[1] == size:
        return a
    z = (size / a.shape[0], size / a.shape[1]) + ((1,) if a.ndim == 3 else ())
    out = ndi.zoom(a, z, order=order, mode="nearest", grid_mode=True)
    return out[:size, :size]


def _dihedral(a: np.ndarray, k: int, flip: bool) -> np.ndarray:
    a = np.rot90(a, k, axes=(0, 1))
    return a[:, ::-1] if flip else a


def _dihedral_points(rc: np.ndarray, k: int, flip: bool, n: int) -> np.ndarray:
    """The same transform as :func:`_dihedral` on (row, col) points of an n x n patch."""
    r, c = rc[:, 0].copy(), rc[:, 1].copy()
    for _ in range(k):  # np.rot90 (counter-clockwise): new[r, c] = old[c, n - 1 - r]
        r, c = n - 1 - c, r
    if flip:
        c = n - 1 - c
    return np.stack([r, c], axis=1)
