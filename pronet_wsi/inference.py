"""Running PRONet on pixels: device choice, batching, autocast, and images larger than one model input.

The only torch <-> numpy boundary: everything in and out is numpy. An image is cut by the same tiler as a slide
(:class:`pronet_wsi.tiling.TileGrid`, halo = the model's ``context_px``). Beyond the image's edge a tile reads the
image's mirror by default (an image is a crop of tissue) or white (``InferenceConfig.beyond_edge``: what a slide
read gives beyond the slide, glass), so ``predict`` of an image and ``segment`` of the same pixels give the same
maps everywhere with ``white``, and beyond the model's context of the image's edge with ``mirror``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pronet_wsi.errors import InputError
from pronet_wsi.geometry import Box
from pronet_wsi.model import ModelBundle, load_model, resolve_model_dir
from pronet_wsi.postprocess import PostprocessConfig, Segmentation, postprocess
from pronet_wsi.runtime import RUNTIMES, OpenVINOForward, auto_streams, choose_runtime, int8_wanted, read_int8_graph
from pronet_wsi.tiling import TileGrid, TilingConfig

BEYOND_EDGE = ("mirror", "white")


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

    batch_size : windows of an image per model call in :meth:`Predictor.predict_image` (a slide's tiles per call
        are ``SegmentConfig.batch_size``; :meth:`Predictor.predict_batch` runs the tiles it is given as one call).
    window_px : largest model input side; an image is cut into tiles of at most this size, each a core plus the
        model's ``context_px`` on every side (the tiles ``segment --tile-px`` of the same size cuts).
    amp : mixed precision (bf16 on CPUs with AVX512-BF16, fp16 on CUDA); ``auto`` decides per device.
    tta : average the maps of the 8 flips/rotations of each tile (offsets rotated back); 8x the model time.
    runtime : the CPU forward's engine: ``auto`` (OpenVINO when installed, else PyTorch; env
        ``PRONET_WSI_RUNTIME`` overrides), ``torch`` or ``openvino`` (see :mod:`pronet_wsi.runtime`).
    threads : CPU threads of the OpenVINO forward (0 = all cores); PyTorch uses ``torch.get_num_threads()``.
    streams : OpenVINO forwards that may run at once, from several threads (``segment``'s tile threads), sharing
        ``threads``: 1 = one forward on all of them (fastest for one caller: ``predict``), 0 = auto (2 where the
        forward has 2 or more cores: ``segment``, whose post-processing threads share the cores).
    int8 : ``auto`` runs the model folder's INT8 graph where it ships one (``int8.ovblob``; the shipped model does)
        and the forward is OpenVINO's; ``off`` (or env ``PRONET_WSI_INT8=off``) runs the float graph.
    beyond_edge : what an image tile reads beyond the image's edge: ``mirror`` (the default: an image is a crop
        of tissue, and white there cost the shipped model 0.08 validation AJI on NuInsSeg's small images) or
        ``white`` (glass, as ``segment`` reads beyond a slide's edge: then ``predict`` equals ``segment`` exactly).
    """

    device: str = "auto"
    batch_size: int = 4
    window_px: int = 1024
    amp: str = "auto"
    tta: bool = False
    runtime: str = "auto"
    threads: int = 0
    streams: int = 1
    int8: str = "auto"
    beyond_edge: str = "mirror"

    def __post_init__(self) -> None:
        if self.beyond_edge not in BEYOND_EDGE:
            raise InputError(f"beyond_edge={self.beyond_edge!r}: must be one of {', '.join(BEYOND_EDGE)}")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime={self.runtime!r}: must be one of {', '.join(RUNTIMES)}")
        if self.threads < 0:
            raise ValueError(f"threads={self.threads}: must be >= 0 (0 = all cores)")
        if not 0 <= self.streams <= 64:
            raise ValueError(f"streams={self.streams}: must be between 0 (auto) and 64")
        if self.batch_size < 1:
            raise InputError(f"batch_size={self.batch_size}: must be >= 1")
        if not 64 <= self.window_px <= 16384 or self.window_px % 16:
            raise InputError(f"window_px={self.window_px}: must be a multiple of 16 between 64 and 16384")
        if self.int8 not in ("auto", "off"):
            raise InputError(f"int8={self.int8!r}: must be auto or off")
        if self.amp not in ("auto", "on", "off"):
            raise InputError(f"amp={self.amp!r}: must be auto, on or off")


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
        self.stride = bundle.config.stride  # tiles align to it
        if config.window_px - 2 * self.context_px < 16:
            raise InputError(f"--window-px {config.window_px}: must be at least {2 * self.context_px + 16} for this "
                             f"model (twice its context of {self.context_px} px plus a 16 px core)")
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
        self.int8_graph: str | None = None  # sha256 of the INT8 graph that runs, if one does
        if self.runtime == "openvino":
            graph = None
            if bundle.path is not None and int8_wanted(config.int8):
                graph, self.int8_graph = read_int8_graph(bundle.path)
            # around an INT8 graph's quantized convolutions f32 was faster than bf16 and as accurate (RESULTS.md)
            self._fast = OpenVINOForward(bundle.model, bundle.config.mean, bundle.config.std,
                                         bf16=self.autocast_dtype is not None and graph is None,
                                         threads=config.threads,
                                         streams=config.streams or auto_streams(config.threads), graph=graph)

    @property
    def concurrency(self) -> int:
        """How many :meth:`predict_batch` calls may run at once (OpenVINO streams; 1 for PyTorch)."""
        return self._fast.streams if self._fast is not None else 1

    @torch.inference_mode()
    def predict_batch(self, tiles: np.ndarray) -> dict[str, np.ndarray]:
        """Maps for a batch of equal-sized tiles, in one model call.

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
        if self._fast is not None:
            return self._fast(tiles)
        x = torch.tensor(tiles).to(self.device)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        x = ((x - self._mean) / self._std).contiguous(
            memory_format=torch.channels_last if self.device.type == "cpu" else torch.contiguous_format)
        maps = self._maps_tta(x) if self.config.tta else self._maps(x)
        return {k: v.cpu().numpy() for k, v in maps.items()}

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
        """Maps for one image of any size, tile by tile (:func:`predict_tiled`, tiles of ``window_px``).

        Parameters
        ----------
        image : (H, W, 3) uint8 RGB at the model's mpp.

        Returns
        -------
        ``foreground`` (H, W), ``offsets`` (2, H, W), ``centers`` (H, W), float32; ``types`` (K, H, W) for a
        typed model.
        """
        return predict_tiled(self, image, TilingConfig(self.config.window_px, self.context_px),
                             self.config.batch_size, self.config.beyond_edge)


def predict_tiled(model, image: np.ndarray, tiling: TilingConfig, batch_size: int = 1,
                  beyond_edge: str = "mirror") -> dict[str, np.ndarray]:
    """Maps of an (H, W, 3) uint8 image from the tiles of ``TileGrid(image.shape[:2], tiling)``.

    Each tile reads its core plus ``tiling.halo_px`` on every side (beyond the image's edge as ``beyond_edge``
    says, :func:`read_tile`) and keeps its core; the cores partition the image. ``segment`` with the same tiling
    computes exactly these maps in every core, so with a halo of at least the model's ``context_px`` an image
    predicted here and the same pixels segmented as a slide give the same nuclei: everywhere with ``white``,
    beyond that context of the image's edge with ``mirror``. ``model`` is anything with ``predict_batch`` ((B, h, w, 3)
    uint8 -> maps with a batch axis).

    Returns
    -------
    The maps of ``predict_batch`` without the batch axis, over the whole image: (H, W) or (C, H, W) float32.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    grid = TileGrid(image.shape[:2], tiling, getattr(model, "stride", 16))
    tiles = list(grid)
    out: dict[str, np.ndarray] = {}
    for i in range(0, len(tiles), batch_size):
        chunk = tiles[i : i + batch_size]
        maps = model.predict_batch(np.stack([read_tile(image, t.read, beyond_edge) for t in chunk]))
        for name, m in maps.items():
            if name not in out:
                out[name] = np.zeros((*m.shape[1:-2], *image.shape[:2]), np.float32)
            for j, t in enumerate(chunk):
                x0, y0, x1, y1 = (int(v) for v in t.core.as_tuple())
                r0, c0 = y0 - int(t.read.y0), x0 - int(t.read.x0)
                out[name][..., y0:y1, x0:x1] = m[j][..., r0 : r0 + y1 - y0, c0 : c0 + x1 - x0]
    return out


def read_tile(image: np.ndarray, box: Box, beyond_edge: str = "mirror") -> np.ndarray:
    """The integer ``box`` (processing frame = the image's pixels) of an (H, W, 3) image; beyond its edge the
    image's mirror (reflect about the edge pixel, as the network saw crops in training) or ``white`` (255, what
    a slide read gives beyond the slide)."""
    x0, y0, x1, y1 = (int(v) for v in box.as_tuple())
    h, w = image.shape[:2]
    if beyond_edge == "white":
        out = np.full((y1 - y0, x1 - x0, *image.shape[2:]), 255, image.dtype)
        r0, c0, r1, c1 = max(y0, 0), max(x0, 0), min(y1, h), min(x1, w)
        if r1 > r0 and c1 > c0:
            out[r0 - y0 : r1 - y0, c0 - x0 : c1 - x0] = image[r0:r1, c0:c1]
        return out
    rows, cols = _mirror_index(np.arange(y0, y1), h), _mirror_index(np.arange(x0, x1), w)
    return image[rows[:, None], cols[None, :]]


def _mirror_index(i: np.ndarray, n: int) -> np.ndarray:
    """Indices into ``n`` pixels, those outside reflected about the edge pixels (numpy's ``reflect``).

    >>> _mirror_index(np.arange(-3, 6), 4).tolist()
    [3, 2, 1, 0, 1, 2, 3, 2, 1]
    """
    if n == 1:
        return np.zeros_like(i)
    period = 2 * (n - 1)
    j = np.mod(i, period)
    return np.where(j < n, j, period - j)


def _unrotate_vectors(offsets: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """(B, 2, H, W) (dy, dx) predicted on a view rotated ``k`` times (np.rot90) then column-flipped, as vectors of
    the original image. The view maps a displacement (dy, dx) to (-dx, dy) per rotation, then dx -> -dx."""
    dy, dx = offsets[:, 0], offsets[:, 1]
    if flip:
        dx = -dx
    for _ in range(k):
        dy, dx = dx, -dy
    return torch.stack([dy, dx], dim=1)


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
    seg = postprocess(predictor.predict_image(work), config or predictor.postprocess_config, work)
    if work.shape[:2] == image.shape[:2]:
        return seg
    labels = resample_labels(seg.labels, image.shape[:2])
    centers = (seg.centers_rc + 0.5) * (np.array(image.shape[:2]) / np.array(work.shape[:2])) - 0.5
    return replace(seg, labels=labels, centers_rc=centers)
