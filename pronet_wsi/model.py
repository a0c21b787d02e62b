"""PRONet (paper Fig. 1): VGG16 encoder, U-Net decoder, and three modules in sequence
(binary -> offset -> centre) joined by residual units and attention units.

``forward(x)`` returns raw maps, the same in train and eval:
``foreground`` (B, 1, H, W) logits, ``offsets`` (B, 2, H, W) (dy, dx) px, ``centers`` (B, 1, H, W) logits, and
for a typed model (``ModelConfig.classes``) ``types`` (B, K, H, W) class logits from a small type head on the
decoder's full-resolution features.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from pronet_wsi.errors import InputError
from pronet_wsi.files import atomic_text, atomic_write, sha256_file
from pronet_wsi.postprocess import PostprocessConfig

VGG16_STAGES = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))  # 13 conv layers in 5 stages
WEIGHTS_FILE = "weights.pt"
ARCHITECTURE = "pronet-vgg16"


TYPE_HEADS = ("small", "deep")


@dataclass(frozen=True)
class ModelConfig:
    """What a model folder records about the network and its input.

    width : channel multiplier; 1.0 = the paper's VGG16 channels (64..512).
    mpp : microns per pixel of the training images; inputs are resampled to it.
    mean, std : per-channel RGB normalisation of inputs scaled to [0, 1].
    offset_scale : the offset head's raw output is multiplied by this (px), so targets are O(1).
    context_px : how far (px) input beyond a pixel still changes the network's maps there; ``segment`` uses it as
        the default tile halo. 96 was measured on v3 (a tile's maps equal the untiled maps beyond 96 px from its
        edge; 64 px leaves |d foreground| 0.05 at the seam), 160 on the shipped stride-2-stem v4 (its deepest
        layers work at 1/32 resolution); it depends on the architecture's depth.
    classes : nucleus class names of the type head (QuPath classification names); empty = an untyped model.
    class_colors : one QuPath colour (r, g, b) per class.
    stem_stride : 1 = the paper's network (its first stage at the input's resolution); 2 = the input is folded
        into 2x2 blocks (pixel unshuffle) so every layer runs at half resolution or less, and the maps are brought
        back to the input's resolution by a bilinear upsampling and a small full-resolution refinement (4x fewer
        pixels through the expensive 16-32 channel layers; benchmarks/RESULTS.md "stride-2 stem").
    type_head : ``small`` = one 3x3 convolution on the decoder's last level; ``deep`` = two on its last two levels
        (the second upsampled), more capacity and context for the classes (benchmarks/RESULTS.md "type head").
    """

    architecture: str = ARCHITECTURE
    width: float = 1.0
    batch_norm: bool = True
    mpp: float = 0.25
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    offset_scale: float = 10.0
    center_radius_px: float = 8.0
    context_px: int = 96
    classes: tuple[str, ...] = ()
    class_colors: tuple[tuple[int, int, int], ...] = ()
    stem_stride: int = 1
    type_head: str = "small"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.architecture != ARCHITECTURE:
            raise InputError(f"architecture={self.architecture!r}: only {ARCHITECTURE!r} is known")
        if not 0.05 <= self.width <= 2.0:
            raise InputError(f"width={self.width}: must be in [0.05, 2.0]")
        if not math.isfinite(self.mpp) or self.mpp <= 0:
            raise InputError(f"mpp={self.mpp}: must be > 0")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) != 3 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                raise InputError(f"{name}={list(values)}: must be 3 finite numbers (R, G, B)")
        if not all(0.0 <= v <= 1.0 for v in self.mean):
            raise InputError(f"mean={list(self.mean)}: must be in [0, 1] (inputs are scaled to [0, 1])")
        if not all(v > 0 for v in self.std):
            raise InputError(f"std={list(self.std)}: must be > 0")
        if not math.isfinite(self.offset_scale) or self.offset_scale <= 0:
            raise InputError(f"offset_scale={self.offset_scale}: must be a finite number > 0")
        if not math.isfinite(self.center_radius_px) or self.center_radius_px <= 0:
            raise InputError(f"center_radius_px={self.center_radius_px}: must be > 0")
        if not isinstance(self.context_px, int) or isinstance(self.context_px, bool) or self.context_px < 0:
            raise InputError(f"context_px={self.context_px}: must be an integer >= 0")
        if self.stem_stride not in (1, 2) or isinstance(self.stem_stride, bool):
            raise InputError(f"stem_stride={self.stem_stride}: must be 1 or 2")
        if self.type_head not in TYPE_HEADS:
            raise InputError(f"type_head={self.type_head!r}: must be one of {', '.join(TYPE_HEADS)}")
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        if len(set(self.classes)) != len(self.classes) or any(not c for c in self.classes):
            raise InputError(f"classes={list(self.classes)}: names must be unique and non-empty")
        colors = tuple(tuple(int(v) for v in c) for c in self.class_colors) or class_colors(self.classes)
        if len(colors) != len(self.classes) or any(len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in colors):
            raise InputError(f"class_colors={self.class_colors}: need one (r, g, b) in 0-255 per class")
        object.__setattr__(self, "class_colors", colors)

    @property
    def stride(self) -> int:
        """The network's total stride: inputs are padded to a multiple of it and tiles align to it."""
        return 16 * self.stem_stride


# QuPath's own colours for its default classes (PathClassFactory), then a palette for other names.
QUPATH_COLORS = {"tumor": (200, 0, 0), "stroma": (150, 200, 150), "immune cells": (160, 90, 160),
                 "necrosis": (50, 50, 50), "other": (255, 200, 0), "region*": (0, 0, 180), "ignore*": (180, 180, 180),
                 "positive": (200, 50, 50), "negative": (112, 112, 225)}
PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (128, 128, 0), (0, 128, 128), (170, 110, 40), (128, 0, 0))


def class_colors(names: tuple[str, ...]) -> tuple[tuple[int, int, int], ...]:
    """A QuPath colour per class name: QuPath's own for its standard classes, a fixed palette otherwise."""
    out: list[tuple[int, int, int]] = []
    k = 0
    for name in names:
        if name.lower() in QUPATH_COLORS:
            out.append(QUPATH_COLORS[name.lower()])
        else:
            out.append(PALETTE[k % len(PALETTE)])
            k += 1
    return tuple(out)


def _ch(c: int, width: float) -> int:
    return max(4, int(round(c * width)))


def _conv(cin: int, cout: int, bn: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.ReLU(inplace=True))
    return layers


class ResidualUnit(nn.Module):
    """x + conv-bn-relu-conv-bn(x), then ReLU: lets a later module reuse an earlier one's features."""

    def __init__(self, c: int, bn: bool) -> None:
        super().__init__()
        norm = nn.BatchNorm2d if bn else nn.Identity
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=not bn), norm(c), nn.ReLU(inplace=True),
                                  nn.Conv2d(c, c, 3, padding=1, bias=not bn), norm(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


class AttentionUnit(nn.Module):
    """Refines features with a later module's prediction: f * (1 + sigmoid(conv(prediction)))."""

    def __init__(self, c_pred: int, c: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.Conv2d(c_pred, c, 3, padding=1), nn.Sigmoid())

    def forward(self, features: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        return features * (1.0 + self.gate(prediction))


class PRONet(nn.Module):
    """PRONet with a VGG16 encoder; any input size (padded internally to a multiple of ``stride``)."""

    def __init__(self, config: ModelConfig = ModelConfig()) -> None:
        super().__init__()
        self.config = config
        bn, w = config.batch_norm, config.width
        self.stride = config.stride
        self.stages = nn.ModuleList()
        cin, chans = 3 * config.stem_stride**2, []
        for c, n in VGG16_STAGES:
            c = _ch(c, w)
            layers: list[nn.Module] = []
            for _ in range(n):
                layers += _conv(cin, c, bn)
                cin = c
            self.stages.append(nn.Sequential(*layers))
            chans.append(c)
        # decoder: up from stage 5, concatenating skips of stages 4..1
        self.decoder = nn.ModuleList()
        c_up = chans[-1]
        for skip in reversed(chans[:-1]):
            self.decoder.append(nn.Sequential(*_conv(c_up + skip, skip, bn), *_conv(skip, skip, bn)))
            c_up = skip
        c = chans[0]
        self.ru_binary = ResidualUnit(c, bn)
        self.ru_offset = ResidualUnit(c, bn)
        self.ru_center = ResidualUnit(c, bn)
        self.au_offset = AttentionUnit(1, c)  # centre prediction refines offset features
        self.au_binary = AttentionUnit(2, c)  # offset prediction refines binary features
        self.head_binary = nn.Conv2d(c, 1, 1)
        self.head_offset = nn.Conv2d(c, 2, 1)
        self.head_center = nn.Conv2d(c, 1, 1)
        self.head_type = type_head(c, len(config.classes), bn, config.type_head, chans[1]) if config.classes else None
        # stride-2 stem: the half-resolution maps (4 channels) upsampled, then corrected from the full-resolution
        # input; zero at initialisation, so the network starts as plain bilinear upsampling
        self.refine: nn.Sequential | None = None
        if config.stem_stride == 2:
            last = nn.Conv2d(c, 4, 1)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(cast(torch.Tensor, last.bias))
            self.refine = nn.Sequential(*_conv(4 + 3, c, bn), last)
        assert self.head_center.bias is not None  # Conv2d defaults to bias=True
        nn.init.constant_(self.head_center.bias, -2.19)  # CenterNet prior: sigmoid = 0.1

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h, w = x.shape[-2:]
        foreground, offsets, centers, types, full = self._heads(x)
        if self.refine is not None:
            maps = self._refined(foreground, offsets, centers, full)
            foreground, offsets, centers = maps[:, :1], maps[:, 1:3] * self.config.offset_scale, maps[:, 3:]
            if types is not None:
                types = F.interpolate(types, scale_factor=2.0, mode="bilinear", align_corners=False)
        out = {"foreground": foreground[..., :h, :w], "offsets": offsets[..., :h, :w], "centers": centers[..., :h, :w]}
        if types is not None:
            out["types"] = types[..., :h, :w]
        return out

    def raw_maps(self, x: torch.Tensor, crop: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The maps of :meth:`forward` as one (B, 4, H, W) tensor, foreground logit, (dy, dx) / ``offset_scale``,
        centre logit, and the type logits (or None): what an exported graph returns (:class:`~pronet_wsi.runtime.
        MapsNet`). With the stride-2 stem's refinement this is the network's own last tensor: slicing and scaling
        it at full resolution inside OpenVINO cost ~20 % of the INT8 forward (benchmarks/RESULTS.md).

        crop : cut the maps back to the input's size; False returns them at the size padded to the stride (for an
        input already padded the same, as the exported graph's is, the cut is the identity yet cost ~10 % of the
        INT8 forward as a dynamic slice in OpenVINO).
        """
        h, w = x.shape[-2:]
        foreground, offsets, centers, types, full = self._heads(x)
        if self.refine is not None:
            maps = self._refined(foreground, offsets, centers, full)
            if types is not None:
                types = F.interpolate(types, scale_factor=2.0, mode="bilinear", align_corners=False)
        else:
            maps = torch.cat([foreground, offsets / self.config.offset_scale, centers], dim=1)
        if not crop:
            return maps, types
        return maps[..., :h, :w], None if types is None else types[..., :h, :w]

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                 torch.Tensor]:
        """Foreground, offsets (px), centres and type logits at the decoder's resolution (half the input's with
        the stride-2 stem), and the padded full-resolution input."""
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.stride, (-w) % self.stride
        if ph or pw:
            mode = "reflect" if h > ph and w > pw else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        full = x
        if self.refine is not None:
            x = F.pixel_unshuffle(x, 2)
        skips = []
        for i, stage in enumerate(self.stages):
            if i:
                x = F.max_pool2d(x, 2)
            x = stage(x)
            skips.append(x)
        coarser = x
        for block, skip in zip(self.decoder, reversed(skips[:-1]), strict=True):
            coarser = x
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        f_binary = self.ru_binary(x)
        f_offset = self.ru_offset(f_binary)
        f_center = self.ru_center(f_offset)
        centers = self.head_center(f_center)
        offsets = self.head_offset(self.au_offset(f_offset, torch.sigmoid(centers))) * self.config.offset_scale
        foreground = self.head_binary(self.au_binary(f_binary, offsets / self.config.offset_scale))
        types = None
        if self.head_type is not None:
            if self.config.type_head == "deep":
                up = F.interpolate(coarser, size=x.shape[-2:], mode="bilinear", align_corners=False)
                types = self.head_type(torch.cat([x, up], dim=1))
            else:
                types = self.head_type(x)
        return foreground, offsets, centers, types, full

    def _refined(self, foreground: torch.Tensor, offsets: torch.Tensor, centers: torch.Tensor,
                 full: torch.Tensor) -> torch.Tensor:
        """The stride-2 stem's full-resolution maps (foreground logit, offsets / offset_scale, centre logit):
        the half-resolution ones upsampled and corrected from the input."""
        assert self.refine is not None
        maps = torch.cat([foreground, offsets / self.config.offset_scale, centers], dim=1)
        maps = F.interpolate(maps, scale_factor=2.0, mode="bilinear", align_corners=False)
        return maps + self.refine(torch.cat([maps, full], dim=1))

    def trunk_parameters(self) -> list[nn.Parameter]:
        """Every parameter but the type head's (what ``freeze_trunk`` keeps fixed)."""
        head = {id(p) for p in self.head_type.parameters()} if self.head_type is not None else set()
        return [p for p in self.parameters() if id(p) not in head]


def type_head(c: int, n_classes: int, bn: bool, kind: str = "small", c_coarser: int = 0) -> nn.Sequential:
    """Per-pixel class logits from the decoder's last level (``c`` channels): conv3x3 (2c) -> conv1x1 (K); ``deep``
    takes the last two levels (c + ``c_coarser`` channels) through two conv3x3 (2c)."""
    if kind == "deep":
        return nn.Sequential(*_conv(c + c_coarser, 2 * c, bn), *_conv(2 * c, 2 * c, bn), nn.Conv2d(2 * c, n_classes, 1))
    return nn.Sequential(*_conv(c, 2 * c, bn), nn.Conv2d(2 * c, n_classes, 1))


def save_model(model: PRONet, path: str | Path, thresholds: PostprocessConfig = PostprocessConfig(),
               extra: dict | None = None) -> Path:
    """Write a model folder: ``config.json``, ``thresholds.json``, ``weights.pt`` (a plain state dict)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = asdict(model.config)
    if extra:
        cfg["extra"] = {**cfg.get("extra", {}), **extra}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    buf = io.BytesIO()  # not torch.save(tmp): the archive would be named after the random temporary file, so the
    torch.save(state, buf)  # same weights would get another sha256 (the model's identity) on every save
    atomic_write(path / WEIGHTS_FILE, lambda tmp: tmp.write_bytes(buf.getvalue()))
    cfg["weights_sha256"] = sha256_file(path / WEIGHTS_FILE)
    atomic_text(path / "config.json", json.dumps(cfg, indent=2) + "\n")
    atomic_text(path / "thresholds.json", json.dumps(asdict(thresholds), indent=2) + "\n")
    return path



@dataclass(frozen=True)
class ModelBundle:
    """A loaded model folder: the network (eval mode), its config and its post-processing thresholds."""

    model: PRONet
    config: ModelConfig
    thresholds: PostprocessConfig
    path: Path | None = None


def load_model(path: str | Path) -> ModelBundle:
    """Read a model folder written by :func:`save_model`; weights load without unpickling code."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise InputError(f"{path}: not a model folder (no config.json); give -m a folder made by `pronet-wsi train`")
    weights = path / WEIGHTS_FILE
    try:
        raw = json.loads((path / "config.json").read_text())
        expected = raw.pop("weights_sha256", None)
        raw["mean"], raw["std"] = tuple(raw["mean"]), tuple(raw["std"])
        raw["classes"] = tuple(raw.get("classes", ()))
        raw["class_colors"] = tuple(tuple(c) for c in raw.get("class_colors", ()))
        config = ModelConfig(**raw)
        thr_file = path / "thresholds.json"
        thresholds = PostprocessConfig(**json.loads(thr_file.read_text())) if thr_file.exists() else PostprocessConfig()
        if thresholds.class_weights and len(thresholds.class_weights) != len(config.classes):
            raise ValueError(f"class_weights: {len(thresholds.class_weights)} values for {len(config.classes)} classes")
        if thresholds.nucleus_classifier is not None:
            thresholds.nucleus_classifier.check_classes(config.classes)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        where = "thresholds.json" if "threshold" in str(exc) or "min_area" in str(exc) or "nms_px" in str(exc) \
            or "class_weights" in str(exc) or "nucleus_classifier" in str(exc) \
            or "grouping" in str(exc) else "config.json"
        raise InputError(f"{path / where}: broken model folder ({_first_line(exc)}); fix that field, or retrain or "
                         "reinstall the model") from exc
    if not weights.is_file():
        raise InputError(f"{weights}: missing; a model folder needs {WEIGHTS_FILE} beside config.json")
    if expected is not None and sha256_file(weights) != expected:
        raise InputError(f"{weights}: checksum does not match config.json (file damaged or replaced); "
                         "reinstall or retrain the model")
    try:  # weights_only: a pickled or crafted file is rejected, never executed
        with warnings.catch_warnings():  # torch warns about what it refuses; the error below says it in one line
            warnings.simplefilter("ignore")
            state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for damaged or foreign files
        kind = "a pickled object, not a plain state dict" if "weights_only" in str(exc) or "Unsupported global" in \
            str(exc) else "not a readable torch state dict"
        raise InputError(f"{weights}: {kind} ({type(exc).__name__}); retrain or reinstall the model") from exc
    try:
        model = PRONet(config)
        model.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - a state dict of another network
        raise InputError(f"{weights}: not weights for this config.json (width {config.width}; "
                         f"{type(exc).__name__}); retrain or reinstall the model") from exc
    model.eval()
    return ModelBundle(model, config, thresholds, path)


def model_identity(path: Path) -> str:
    """A model folder's identity by content: a digest of ``config.json`` (with the weights' sha256) and
    ``thresholds.json``, the same for a copy of the folder anywhere; ``sha256:<16 hex>``."""
    path = Path(path)
    try:
        cfg = json.loads((path / "config.json").read_text())
        if not isinstance(cfg, dict):
            cfg = {"config": cfg}
        if not cfg.get("weights_sha256") and (path / WEIGHTS_FILE).is_file():
            cfg["weights_sha256"] = sha256_file(path / WEIGHTS_FILE)
        thr_file = path / "thresholds.json"
        thr = json.loads(thr_file.read_text()) if thr_file.exists() else None
    except (OSError, ValueError):
        return f"unreadable:{path.resolve()}"
    text = json.dumps({"config": cfg, "thresholds": thr}, sort_keys=True, default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
DEFAULT_MODEL = "pronet-multilab"


def default_model_dir() -> Path | None:
    """The shipped model folder, or None when none is installed.

    A wheel or sdist install carries it as package data (``pronet_wsi.models``, the repo's ``models/``); an
    editable install or a checkout finds it at the top of the repository.
    """
    candidates = [MODELS_DIR / DEFAULT_MODEL]
    try:
        from importlib.resources import files

        # a Traversable; a real folder is a PathLike, anything else makes fspath raise TypeError (caught below)
        resource = cast("os.PathLike[str]", files("pronet_wsi.models").joinpath(DEFAULT_MODEL))
        candidates.insert(0, Path(os.fspath(resource)))
    except (ModuleNotFoundError, TypeError, ValueError):  # not installed as package data
        pass
    return next((c for c in candidates if (c / "config.json").is_file()), None)


def resolve_model_dir(path: str | Path | None) -> Path:
    """``-m`` or the shipped model; a clear error when neither exists."""
    if path is not None:
        return Path(path)
    found = default_model_dir()
    if found is None:
        raise InputError(f"no model given and no default model installed at {MODELS_DIR / DEFAULT_MODEL}; "
                         "pass -m MODEL_DIR (a folder made by `pronet-wsi train`)")
    return found
