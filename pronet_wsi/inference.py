"""Running PRONet on pixels: device choice, batching, autocast, sliding windows.

The only torch <-> numpy boundary: everything in and out is numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pronet_wsi.errors import InputError
from pronet_wsi.model import ModelBundle, load_model, resolve_model_dir
from pronet_wsi.postprocess import PostprocessConfig, Segmentation, postprocess
from pronet_wsi.runtime import RUNTIMES, OpenVINOForward, choose_runtime


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` = CUDA when present, else CPU; otherwise a torch device string."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise InputError(f"--device {device!r}: unknown device; use auto, cpu or cuda[:N]") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return dev


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX")) and \
            "bf16" in open("/proc/cpuinfo").read()
    except OSError:
        return False


@dataclass(frozen=True)
class InferenceConfig:
    """How to run the network.

    window_px : images larger than this run in overlapping windows of this size.
    overlap_px : overlap between windows; the central part of each window is kept.
    amp : mixed precision (bf16 on CPUs with AVX512-BF16, fp16 on CUDA); ``auto`` decides per device.
    tta : average the maps of the 8 flips/rotations of each tile (offsets rotated back); 8x the model time.
    runtime : the CPU forward's engine: ``auto`` (OpenVINO when installed, else PyTorch; env
        ``PRONET_WSI_RUNTIME`` overrides), ``torch`` or ``openvino`` (see :mod:`pronet_wsi.runtime`).
    threads : CPU threads of the OpenVINO forward (0 = all cores); PyTorch uses ``torch.get_num_threads()``.
    """

    device: str = "auto"
    batch_size: int = 4
    window_px: int = 1024
    overlap_px: int = 64
    amp: str = "auto"
    tta: bool = False
    runtime: str = "auto"
    threads: int = 0

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime={self.runtime!r}: must be one of {', '.join(RUNTIMES)}")
        if self.threads < 0:
            raise ValueError(f"threads={self.threads}: must be >= 0 (0 = all cores)")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: must be >= 1")
        if self.window_px < 64 or self.window_px % 16:
            raise ValueError(f"window_px={self.window_px}: must be a multiple of 16 and >= 64")
        if not 0 <= 2 * self.overlap_px < self.window_px:
            raise ValueError(f"overlap_px={self.overlap_px}: must be >= 0 and < window_px / 2")
        if self.amp not in ("auto", "on", "off"):
            raise ValueError(f"amp={self.amp!r}: must be auto, on or off")


class Predictor:
    """A loaded model on a device: numpy tiles in, probability/offset maps out.

    Attributes ``mpp`` (um/px the model expects) and ``postprocess_config`` are what the whole-slide
    pipeline needs; any object with these and :meth:`predict_batch` can stand in (e.g. an oracle).
    """

    def __init__(self, model: ModelBundle | str | Path | None = None, config: InferenceConfig = InferenceConfig()):
        bundle = model if isinstance(model, ModelBundle) else load_model(resolve_model_dir(model))
        self.bundle = bundle
        self.config = config
        self.device = resolve_device(config.device)
        self.model = bundle.model.to(self.device).eval()
        if self.device.type == "cpu":
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch stubs
        self.mpp = bundle.config.mpp
        self.postprocess_config: PostprocessConfig = bundle.thresholds
        self.context_px = bundle.config.context_px  # the tile halo this model needs for seam-exact maps
        self.classes: tuple[str, ...] = bundle.config.classes  # nucleus classes of a typed model; () = untyped
        self.class_colors = bundle.config.class_colors
        amp = config.amp
        if amp == "auto":
            amp = "on" if (self.device.type == "cuda" or _cpu_has_bf16()) else "off"
        self.autocast_dtype = None
        if amp == "on":
            self.autocast_dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        mean = torch.tensor(bundle.config.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(bundle.config.std, dtype=torch.float32).view(1, 3, 1, 1)
        self._mean, self._std = mean.to(self.device), std.to(self.device)
        # TTA stays on PyTorch (it transforms tensors between forwards); so does CUDA
        self.runtime = "torch" if config.tta else choose_runtime(config.runtime, self.device)
        self._fast: OpenVINOForward | None = None
        if self.runtime == "openvino":
            names = ("foreground", "offsets", "centers", *(("types",) if self.classes else ()))
            self._fast = OpenVINOForward(bundle.model, bundle.config.mean, bundle.config.std, names,
                                         bf16=self.autocast_dtype is not None, threads=config.threads)

    @torch.inference_mode()
    def predict_batch(self, tiles: np.ndarray) -> dict[str, np.ndarray]:
        """Maps for a batch of equal-sized tiles.

        Parameters
        ----------
        tiles : (B, H, W, 3) uint8 RGB at the model's mpp.

        Returns
        -------
        ``foreground`` (B, H, W) float32 probability, ``offsets`` (B, 2, H, W) float32 (dy, dx) px,
        ``centers`` (B, H, W) float32 probability; a typed model adds ``types`` (B, K, H, W) float32 class
        probabilities (softmax over the model's ``classes``).
        """
        tiles = np.asarray(tiles)
        if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
            raise ValueError(f"tiles must be (B, H, W, 3) uint8, got {tiles.shape} {tiles.dtype}")
        outs: list[dict[str, np.ndarray]] = []
        for start in range(0, len(tiles), self.config.batch_size):
            if self._fast is not None:
                outs.append(self._fast(tiles[start : start + self.config.batch_size]))
                continue
            x = torch.tensor(tiles[start : start + self.config.batch_size]).to(self.device)
            x = x.permute(0, 3, 1, 2).float().div_(255.0)
            x = ((x - self._mean) / self._std).contiguous(
                memory_format=torch.channels_last if self.device.type == "cpu" else torch.contiguous_format)
            maps = self._maps_tta(x) if self.config.tta else self._maps(x)
            outs.append({k: v.cpu().numpy() for k, v in maps.items()})
        return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}

    def _maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Probabilities and offsets (float32) for a normalised (B, 3, H, W) batch."""
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            raw = self.model(x)
        maps = {"foreground": torch.sigmoid(raw["foreground"].float())[:, 0],
                "offsets": raw["offsets"].float(),
                "centers": torch.sigmoid(raw["centers"].float())[:, 0]}
        if "types" in raw:
            maps["types"] = torch.softmax(raw["types"].float(), dim=1)
        return maps

    def _maps_tta(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`_maps` averaged over the 8 dihedral views, each mapped back (offset vectors rotated too)."""
        acc: dict[str, torch.Tensor] = {}
        for k in range(4):
            for flip in (False, True):
                view = torch.rot90(x, k, dims=(2, 3))
                view = torch.flip(view, dims=(3,)) if flip else view
                maps = self._maps(view)
                for name, m in maps.items():
                    m = torch.flip(m, dims=(m.ndim - 1,)) if flip else m
                    m = torch.rot90(m, -k, dims=(m.ndim - 2, m.ndim - 1))
                    if name == "offsets":
                        m = _unrotate_vectors(m, k, flip)
                    acc[name] = acc[name] + m if name in acc else m
        return {name: m / 8 for name, m in acc.items()}

    def predict_image(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """Maps for one image of any size, in overlapping windows when larger than ``window_px``.

        Parameters
        ----------
        image : (H, W, 3) uint8 RGB at the model's mpp.

        Returns
        -------
        ``foreground`` (H, W), ``offsets`` (2, H, W), ``centers`` (H, W), float32; ``types`` (K, H, W) for a
        typed model.
        """
        h, w = image.shape[:2]
        win, ov = self.config.window_px, self.config.overlap_px
        if h <= win and w <= win:
            return {k: v[0] for k, v in self.predict_batch(image[None]).items()}
        out = {"foreground": np.zeros((h, w), np.float32), "offsets": np.zeros((2, h, w), np.float32),
               "centers": np.zeros((h, w), np.float32)}
        if self.classes:
            out["types"] = np.zeros((len(self.classes), h, w), np.float32)
        boxes = list(_windows(h, w, win, ov))
        for i in range(0, len(boxes), self.config.batch_size):
            chunk = boxes[i : i + self.config.batch_size]
            tiles = np.stack([_crop_padded(image, r0, c0, win) for r0, c0, *_ in chunk])
            maps = self.predict_batch(tiles)
            for j, (r0, c0, kr0, kc0, kr1, kc1) in enumerate(chunk):
                sl = (slice(kr0, kr1), slice(kc0, kc1))
                loc = (slice(kr0 - r0, kr1 - r0), slice(kc0 - c0, kc1 - c0))
                out["foreground"][sl] = maps["foreground"][j][loc]
                out["centers"][sl] = maps["centers"][j][loc]
                for name in ("offsets", "types") if self.classes else ("offsets",):
                    out[name][(slice(None), *sl)] = maps[name][j][(slice(None), *loc)]
        return out


def _unrotate_vectors(offsets: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """(B, 2, H, W) (dy, dx) predicted on a view rotated ``k`` times (np.rot90) then column-flipped, as vectors of
    the original image. The view maps a displacement (dy, dx) to (-dx, dy) per rotation, then dx -> -dx."""
    dy, dx = offsets[:, 0], offsets[:, 1]
    if flip:
        dx = -dx
    for _ in range(k):
        dy, dx = dx, -dy
    return torch.stack([dy, dx], dim=1)


def _windows(h: int, w: int, win: int, ov: int):
    """Windows (r0, c0) with their kept core box (kr0, kc0, kr1, kc1); the cores partition the image.

    Consecutive windows overlap by at least ``2 * ov``; the core boundary is the middle of the overlap.
    """

    def axis(n: int) -> list[tuple[int, int, int]]:
        if n <= win:
            return [(0, 0, n)]
        starts = sorted(set(list(range(0, n - win, win - 2 * ov)) + [n - win]))
        cuts = [0] + [(a + win + b) // 2 for a, b in zip(starts[:-1], starts[1:], strict=True)] + [n]
        return [(s, cuts[i], cuts[i + 1]) for i, s in enumerate(starts)]

    for r0, kr0, kr1 in axis(h):
        for c0, kc0, kc1 in axis(w):
            yield r0, c0, kr0, kc0, kr1, kc1


def _crop_padded(image: np.ndarray, r0: int, c0: int, win: int) -> np.ndarray:
    crop = image[r0 : r0 + win, c0 : c0 + win]
    if crop.shape[:2] != (win, win):
        crop = np.pad(crop, ((0, win - crop.shape[0]), (0, win - crop.shape[1]), (0, 0)), mode="reflect")
    return crop


def resample_image(image: np.ndarray, scale: float) -> np.ndarray:
    """Resize an (H, W, 3) uint8 image by ``scale`` (bilinear, antialiased when shrinking)."""
    if abs(scale - 1.0) < 1e-3:
        return image
    t = torch.as_tensor(np.asarray(image, np.float32)).permute(2, 0, 1)[None]  # a copy: inputs may be read-only
    size = (max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale)))
    out = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=scale < 1)
    return out[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()


def resample_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an instance map to ``shape``."""
    if labels.shape == tuple(shape):
        return labels
    rows = np.minimum((np.arange(shape[0]) + 0.5) * labels.shape[0] / shape[0], labels.shape[0] - 1).astype(int)
    cols = np.minimum((np.arange(shape[1]) + 0.5) * labels.shape[1] / shape[1], labels.shape[1] - 1).astype(int)
    return labels[rows[:, None], cols[None, :]]


def segment_image(image: np.ndarray, predictor: Predictor, mpp: float | None = None,
                  config: PostprocessConfig | None = None) -> Segmentation:
    """Instances for one RGB image whose resolution is ``mpp`` (default: the model's).

    The image is resampled to the model's mpp, segmented, and the labels are resampled back;
    ``centers_rc`` are returned in the input image's frame.
    """
    scale = 1.0 if mpp is None else mpp / predictor.mpp
    work = resample_image(image, scale)
    seg = postprocess(predictor.predict_image(work), config or predictor.postprocess_config)
    if work.shape[:2] == image.shape[:2]:
        return seg
    labels = resample_labels(seg.labels, image.shape[:2])
    centers = (seg.centers_rc + 0.5) * (np.array(image.shape[:2]) / np.array(work.shape[:2])) - 0.5
    return replace(seg, labels=labels, centers_rc=centers)
