"""Whole-slide images in: OpenSlide, tiffslide, or a plain PNG/JPEG/TIFF as a one-level slide.

Every region comes back as (H, W, 3) uint8 RGB; transparent pixels and pixels outside the slide are white.
Coordinates are level-0 ``(x, y)`` in QuPath's frame: OpenSlide's ``openslide.bounds-x/y`` are subtracted,
so ``(0, 0)`` is the top-left of the bounds rectangle (what QuPath shows for MRXS and other bounded slides).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pronet_wsi.errors import InputError
from pronet_wsi.geometry import Box, best_level

log = logging.getLogger(__name__)

BACKENDS = ("auto", "openslide", "tiffslide", "image")
PLAIN_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
#: ``auto`` reads these with tiffslide first when tiffslide names them Aperio or a generic TIFF: the same pixels as
#: OpenSlide (checked on Aperio JPEG and JPEG 2000 slides and pyramidal TIFFs) for 1.1-4.6x less CPU per read
#: (OpenSlide's RGBA image, its copy and the alpha check; benchmarks/RESULTS.md). Other vendors' TIFFs and every
#: other format: OpenSlide first.
TIFFSLIDE_FIRST = (".svs", ".tif", ".tiff")
TIFFSLIDE_VENDORS = ("aperio", None)
MPP_RANGE = (0.05, 2.0)  # plausible microscope pixel sizes (um); outside it a file's value is a dpi default


def plausible_mpp(mpp: float) -> bool:
    """True for a microscope pixel size: strictly inside :data:`MPP_RANGE` (the one test of it everywhere).

    >>> plausible_mpp(0.25), plausible_mpp(0.5), plausible_mpp(2.0), plausible_mpp(84.7), plausible_mpp(float("nan"))
    (True, True, False, False, False)
    """
    return bool(MPP_RANGE[0] < mpp < MPP_RANGE[1])


class Slide:
    """An open slide. Use :func:`open_slide`; close with :meth:`close` or a ``with`` block.

    Attributes
    ----------
    path : the file.
    backend : ``"openslide"``, ``"tiffslide"`` or ``"image"`` (a plain image held in memory).
    mpp : um per level-0 pixel (from the slide, or the ``--mpp`` override).
    mpp_source : ``"slide"`` or ``"--mpp"``.
    bounds : level-0 box of the region QuPath shows, in OpenSlide's full frame.
    level_downsamples : tuple of float, level-0 px per level-L px.
    level_shapes : tuple of ``(H, W)`` per level (full frame).
    """

    def __init__(self, path: Path, backend: str, handle, mpp: float, mpp_source: str, bounds: Box,
                 level_shapes: tuple[tuple[int, int], ...], level_downsamples: tuple[float, ...]) -> None:
        self.path = path
        self.backend = backend
        self._h = handle
        self.mpp = mpp
        self.mpp_source = mpp_source
        self.bounds = bounds
        self.level_shapes = level_shapes
        self.level_downsamples = level_downsamples
        self.pixel_max: int | None = None  # full intensity of 16-bit pixels (None: 8-bit)
        self.notes: list[str] = []  # how the pixels were read, for the run record (e.g. 12-bit data)

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)`` of the level-0 region QuPath shows (the bounds rectangle)."""
        return int(self.bounds.height), int(self.bounds.width)

    @property
    def level_count(self) -> int:
        return len(self.level_shapes)

    def info(self) -> dict:
        """Plain-JSON summary for run records."""
        return {"path": str(self.path), "backend": self.backend, "mpp": self.mpp, "mpp_source": self.mpp_source,
                "shape_hw": list(self.shape), "bounds_xywh": [self.bounds.x0, self.bounds.y0, self.bounds.width,
                                                             self.bounds.height],
                "levels": [{"shape_hw": list(s), "downsample": d}
                           for s, d in zip(self.level_shapes, self.level_downsamples, strict=True)],
                **({"pixel_max": self.pixel_max} if self.pixel_max else {}),
                **({"notes": list(self.notes)} if self.notes else {})}

    # -- reading ---------------------------------------------------------------------------------------------
    def read_level(self, x: int, y: int, level: int, shape: tuple[int, int]) -> np.ndarray:
        """Read ``shape`` ``(H, W)`` pixels at ``level`` whose top-left is level-L pixel ``(x, y)`` of the
        full frame (not bounds-relative). Pixels outside the level are white.

        Returns (H, W, 3) uint8.
        """
        h, w = shape
        out = np.full((h, w, 3), 255, np.uint8)
        lh, lw = self.level_shapes[level]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if x1 <= x0 or y1 <= y0:
            return out
        try:
            part = self._read(x0, y0, level, (y1 - y0, x1 - x0))
        except InputError:
            raise
        except Exception as exc:  # any decoder failure: the file is damaged
            raise InputError(f"{self.path}: reading level {level} at ({x0}, {y0}) failed ({type(exc).__name__}: "
                             f"{exc}); the slide may be truncated or corrupt") from exc
        out[y0 - y : y1 - y, x0 - x : x1 - x] = part
        return out

    def _read(self, x: int, y: int, level: int, shape: tuple[int, int]) -> np.ndarray:
        h, w = shape
        if self.backend == "image":
            return self._h[y : y + h, x : x + w]
        ds = self.level_downsamples[level]
        loc = (int(round(x * ds)), int(round(y * ds)))  # OpenSlide wants level-0 coordinates
        if self.backend == "openslide":
            rgba = np.asarray(self._h.read_region(loc, level, (w, h)))
        else:
            rgba = np.asarray(self._h.read_region(loc, level, (w, h), as_array=True))
        if rgba.dtype == np.uint16:
            from pronet_wsi.images import scale_uint16

            rgba = scale_uint16(rgba, self.pixel_max or 65535)
        return _to_rgb(rgba)

    def read_box(self, box: Box, shape: tuple[int, int]) -> np.ndarray:
        """Resample a level-0 box (QuPath frame, float) to ``shape`` ``(H, W)`` pixels.

        Reads from the coarsest pyramid level that is at least as fine as needed; an integer box at an exact
        level downsample is read without resampling. Returns (H, W, 3) uint8.
        """
        h, w = shape
        target_ds = box.width / w
        level = best_level(self.level_downsamples, target_ds)
        ds = self.level_downsamples[level]
        # box in level-L coordinates of the full frame
        lx0, ly0 = (box.x0 + self.bounds.x0) / ds, (box.y0 + self.bounds.y0) / ds
        lx1, ly1 = (box.x1 + self.bounds.x0) / ds, (box.y1 + self.bounds.y0) / ds
        if (abs(target_ds - ds) < 1e-9 * ds and _is_int(lx0) and _is_int(ly0)):
            return self.read_level(int(round(lx0)), int(round(ly0)), level, shape)
        f = max(1.0, (lx1 - lx0) / w)
        margin = int(math.ceil(2 * f)) + 2
        ix0, iy0 = math.floor(lx0) - margin, math.floor(ly0) - margin
        ix1, iy1 = math.ceil(lx1) + margin, math.ceil(ly1) + margin
        src = self.read_level(ix0, iy0, level, (iy1 - iy0, ix1 - ix0))
        img = Image.fromarray(src).resize((w, h), Image.Resampling.BILINEAR,
                                          box=(lx0 - ix0, ly0 - iy0, lx1 - ix0, ly1 - iy0))
        return np.asarray(img)

    def thumbnail(self, max_side_px: int = 2048, min_downsample: float = 1.0) -> tuple[np.ndarray, float]:
        """Whole bounds region at a downsample ``>= min_downsample`` with the long side ``<= max_side_px``.

        Returns ``(rgb, downsample)``: (h, w, 3) uint8 and level-0 px per thumbnail px.
        """
        H, W = self.shape
        ds = max(min_downsample, max(H, W) / max_side_px, 1.0)
        h, w = max(1, int(round(H / ds))), max(1, int(round(W / ds)))
        out = np.empty((h, w, 3), np.uint8)
        step = 512  # read in blocks, so a slide without coarse levels never sits in memory whole
        for r in range(0, h, step):
            for c in range(0, w, step):
                bh, bw = min(step, h - r), min(step, w - c)
                out[r : r + bh, c : c + bw] = self.read_box(Box(c * ds, r * ds, (c + bw) * ds, (r + bh) * ds),
                                                            (bh, bw))
        return out, ds

    def close(self) -> None:
        if self.backend != "image" and self._h is not None:
            self._h.close()
        self._h = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_int(v: float) -> bool:
    return abs(v - round(v)) < 1e-9


def _to_rgb(arr: np.ndarray) -> np.ndarray:
    """(H, W, 3|4) uint8 -> (H, W, 3) uint8 with alpha composited on white."""
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.shape[-1] == 4:
        if arr[..., 3].min() == 255:  # opaque (the usual case): no compositing needed
            return np.ascontiguousarray(arr[..., :3])
        a = arr[..., 3:4].astype(np.uint16)
        rgb = (arr[..., :3].astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
        return rgb.astype(np.uint8)
    return np.ascontiguousarray(arr[..., :3], dtype=np.uint8)


# -- opening -------------------------------------------------------------------------------------------------
def open_slide(path: str | os.PathLike, backend: str = "auto", mpp: float | None = None) -> Slide:
    """Open a whole-slide image or a plain image as a one-level slide.

    Parameters
    ----------
    path : slide file (anything OpenSlide or tiffslide reads, or a PNG/JPEG/TIFF image).
    backend : ``"auto"`` (OpenSlide, then tiffslide, then a plain image; tiffslide first for an Aperio or generic
        TIFF, :data:`TIFFSLIDE_FIRST`), ``"openslide"`` or ``"tiffslide"``.
    mpp : um per level-0 pixel; overrides the slide's own value, required when the slide has none.

    Raises
    ------
    InputError : missing, unreadable, truncated file; unknown backend; no mpp and no ``mpp``.
    """
    path = Path(path)
    if backend not in BACKENDS:
        raise InputError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if not path.exists():
        raise InputError(f"{path}: file not found; check the path")
    if not path.is_file():
        raise InputError(f"{path}: not a file; give a slide file")
    if mpp is not None and not plausible_mpp(mpp):
        raise InputError(f"--mpp {mpp}: must be a pixel size in um between {MPP_RANGE[0]} and {MPP_RANGE[1]}")
    _check_not_truncated(path)
    errors: list[str] = []
    order: tuple[str, ...] = (backend,)
    if backend == "auto":
        first = ("tiffslide-first",) if path.suffix.lower() in TIFFSLIDE_FIRST else ()
        order = first + ("openslide", "tiffslide", "image")
    for name in order:
        try:
            slide = _OPENERS[name](path)
        except ImportError as exc:
            errors.append(f"{name}: not installed ({exc})")
            continue
        except InputError as exc:
            if name == "image" and path.suffix.lower() in PLAIN_SUFFIXES:
                raise  # a plain image with a real reason (grayscale, unsupported pixels): say it
            errors.append(f"{name}: {type(exc).__name__}")
            continue
        except Exception as exc:
            errors.append(f"{name}: {type(exc).__name__}")
            continue
        return _resolve_mpp(slide, mpp)
    errors = [e for e in errors if not e.startswith("tiffslide-first")]  # tiffslide's own try says it
    raise InputError(f"{path}: cannot be read as a slide ({'; '.join(errors)}); give a file OpenSlide or tiffslide "
                     f"reads, or a PNG/JPEG/TIFF image")


def _resolve_mpp(slide: Slide, override: float | None) -> Slide:
    if override is not None:
        if slide.mpp and abs(slide.mpp - override) > 0.01 * override:
            log.info("%s: using --mpp %g instead of the slide's %g", slide.path, override, slide.mpp)
        slide.mpp, slide.mpp_source = float(override), "--mpp"
        return slide
    if not slide.mpp:
        slide.close()
        raise InputError(f"{slide.path}: the slide records no pixel size (mpp); pass --mpp UM_PER_PX "
                         f"(e.g. --mpp 0.25 for a 40x scan, 0.5 for 20x)")
    if not plausible_mpp(slide.mpp):
        slide.close()
        raise InputError(f"{slide.path}: the file says {slide.mpp:g} um/px, not a microscope pixel size (a dpi "
                         "default?); pass the true one with --mpp (e.g. 0.25 for 40x, 0.5 for 20x)")
    return slide


def _check_not_truncated(path: Path) -> None:
    """Refuse a TIFF-based file whose structure is damaged or whose image data runs past the end of the file."""
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic[:2] not in (b"II", b"MM"):
        return  # not a TIFF: let the backends decide
    import tifffile

    size = path.stat().st_size
    tiff_log = logging.getLogger("tifffile")
    level = tiff_log.level
    tiff_log.setLevel(logging.CRITICAL)  # its warnings about a damaged file become our one error
    try:
        with tifffile.TiffFile(path) as tif:
            if len(tif.pages) == 0:
                raise ValueError("no readable image directory")
            for page in tif.pages:
                offsets, counts = page.dataoffsets, page.databytecounts
                if offsets and max(o + c for o, c in zip(offsets, counts, strict=False)) > size:
                    raise InputError(f"{path}: truncated file (image data runs past the end at {size} bytes); "
                                     f"copy or download it again")
    except InputError:
        raise
    except Exception as exc:  # tifffile cannot parse it: damaged (or cut before its image directories)
        raise InputError(f"{path}: damaged TIFF/slide file ({type(exc).__name__}; truncated?); copy or download "
                         f"it again") from exc
    finally:
        tiff_log.setLevel(level)


def _float_prop(props, *keys: str) -> float | None:
    for k in keys:
        v = props.get(k)
        if v not in (None, ""):
            try:
                f = float(v)
            except (TypeError, ValueError):
                continue
            if f > 0 and math.isfinite(f):
                return f
    return None


def _open_openslide(path: Path) -> Slide:
    import openslide

    h = openslide.OpenSlide(str(path))
    mpp = _float_prop(h.properties, "openslide.mpp-x")
    return Slide(path, "openslide", h, mpp or 0.0, "slide", _bounds(h.properties, "openslide", h.dimensions),
                 tuple((hh, ww) for ww, hh in h.level_dimensions), tuple(float(d) for d in h.level_downsamples))


def _bounds(props, prefix: str, dims: tuple[int, int]) -> Box:
    """The ``<prefix>.bounds-*`` rectangle QuPath shows (the whole level 0 when absent)."""
    bx = int(_float_prop(props, f"{prefix}.bounds-x") or 0)
    by = int(_float_prop(props, f"{prefix}.bounds-y") or 0)
    w0, h0 = dims
    bw = int(_float_prop(props, f"{prefix}.bounds-width") or (w0 - bx))
    bh = int(_float_prop(props, f"{prefix}.bounds-height") or (h0 - by))
    return Box(bx, by, bx + bw, by + bh)


def _open_tiffslide(path: Path, vendors: tuple[str | None, ...] | None = None) -> Slide:
    """tiffslide's slide; with ``vendors``, only a file tiffslide names as one of them (an InputError otherwise)."""
    import tiffslide

    h = tiffslide.TiffSlide(str(path))
    if vendors is not None and h.properties.get("tiffslide.vendor") not in vendors:
        h.close()
        raise InputError(f"{path}: left to OpenSlide")
    mpp = _float_prop(h.properties, "tiffslide.mpp-x")
    slide = Slide(path, "tiffslide", h, mpp or 0.0, "slide", _bounds(h.properties, "tiffslide", h.dimensions),
                  tuple((hh, ww) for ww, hh in h.level_dimensions), tuple(float(d) for d in h.level_downsamples))
    _check_pixels(slide, h)
    return slide


def _check_pixels(slide: Slide, handle) -> None:
    """Grayscale slides are refused; 16-bit ones get the range that means full intensity (12-bit data)."""
    from pronet_wsi.images import sample_max, tiff_sample_tags

    level = len(slide.level_shapes) - 1
    lh, lw = slide.level_shapes[level]
    side = min(lh, lw, 64)
    probe = np.asarray(handle.read_region((0, 0), level, (side, side), as_array=True))
    if probe.ndim == 2 or (probe.ndim == 3 and probe.shape[-1] == 1):
        raise InputError(f"{slide.path}: grayscale image; pronet-wsi needs an RGB (H&E) slide")
    if probe.dtype != np.uint16:
        return
    bits, declared = tiff_sample_tags(slide.path)
    observed = int(np.asarray(handle.read_region((0, 0), level, (lw, lh), as_array=True)).max()) \
        if lh * lw <= 64e6 else 65535
    slide.pixel_max, note = sample_max(observed, bits, declared)
    if note:
        slide.notes.append(note)


def _open_image(path: Path) -> Slide:
    from pronet_wsi.images import read_image

    if path.suffix.lower() not in PLAIN_SUFFIXES:
        raise InputError(f"{path}: not a plain image")
    notes: list[str] = []
    arr = read_image(path, notes)
    mpp = _tiff_mpp(path) if path.suffix.lower() in (".tif", ".tiff") else None
    h, w = arr.shape[:2]
    slide = Slide(path, "image", arr, mpp or 0.0, "slide", Box(0, 0, w, h), ((h, w),), (1.0,))
    slide.notes = [n.split(": ", 1)[-1] for n in notes]
    return slide


def _tiff_mpp(path: Path) -> float | None:
    """um/px from TIFF XResolution/ResolutionUnit (inch or centimetre); None when absent or a 72/96 dpi default."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            tags = tif.pages.first.tags
            if "XResolution" not in tags or "ResolutionUnit" not in tags:
                return None
            num, den = tags["XResolution"].value
            unit = int(tags["ResolutionUnit"].value)
    except Exception:
        return None
    if not num or not den:
        return None
    per_unit = num / den
    if unit == 2:  # inch
        if per_unit in (72.0, 96.0, 300.0):
            return None
        return 25400.0 / per_unit
    if unit == 3:  # centimetre
        return 10000.0 / per_unit
    return None


_OPENERS: dict[str, Callable[[Path], Slide]] = {
    "openslide": _open_openslide, "tiffslide": _open_tiffslide, "image": _open_image,
    "tiffslide-first": functools.partial(_open_tiffslide, vendors=TIFFSLIDE_VENDORS)}


# -- writing (demo slides, tests, benchmarks) -------------------------------------------------------------------
def write_pyramid_tiff(path: str | os.PathLike, image, mpp: float, *, tile_px: int = 256, levels: int | None = None,
                       compression: str = "jpeg", quality: int = 90, shape: tuple[int, int] | None = None,
                       maxworkers: int | None = None) -> None:
    """Write a tiled pyramidal TIFF that OpenSlide (generic-tiff) and tiffslide both read.

    Levels are successive main-chain pages (OpenSlide ignores SubIFDs), each half the size of the previous.

    Parameters
    ----------
    image : (H, W, 3) uint8 array, or a callable ``tile(level, row, col) -> (tile_px, tile_px, 3) uint8``
        (with ``shape`` given) for slides too large to hold in memory.
    mpp : um per level-0 pixel, stored as the resolution tags.
    levels : number of levels (default: halve until the long side is <= 1024 px).
    compression : ``"jpeg"`` (lossy), ``"zlib"`` or ``"lzw"`` (lossless).
    maxworkers : threads compressing tiles (tifffile's default when None).
    """
    import tifffile

    if callable(image):
        if shape is None:
            raise ValueError("shape is required when image is a tile callable")
        h0, w0 = shape
    else:
        image = np.asarray(image, np.uint8)
        h0, w0 = image.shape[:2]
    if levels is None:
        levels = 1
        while max(h0, w0) / 2**levels > 1024 and min(h0, w0) / 2**levels >= tile_px:
            levels += 1
    args: dict[str, Any] = {"compression": compression}
    if compression == "jpeg":
        args["compressionargs"] = {"level": quality}
    current = image
    with tifffile.TiffWriter(path, bigtiff=h0 * w0 * 3 > 2**31) as tif:
        for lvl in range(levels):
            ds = 2**lvl
            h, w = -(-h0 // ds), -(-w0 // ds)
            if callable(image):
                data = _tile_iter(image, lvl, h, w, tile_px)
                kw: dict[str, Any] = {"shape": (h, w, 3), "dtype": np.uint8}
            else:
                if lvl:
                    current = _halve(current)
                data, kw = current, {}
            tif.write(data, tile=(tile_px, tile_px), photometric="rgb", subfiletype=0 if lvl == 0 else 1,
                      resolution=(1e4 / (mpp * ds), 1e4 / (mpp * ds)), resolutionunit="CENTIMETER",
                      metadata=None, maxworkers=maxworkers, **args, **kw)


def _tile_iter(fn, level: int, h: int, w: int, tile_px: int):
    for r in range(0, h, tile_px):
        for c in range(0, w, tile_px):
            yield np.asarray(fn(level, r // tile_px, c // tile_px), np.uint8)


def _halve(img: np.ndarray) -> np.ndarray:
    """2x box downsample of (H, W, 3) uint8 (odd edges repeat the last row/column)."""
    h, w = img.shape[:2]
    if h % 2 or w % 2:
        img = np.pad(img, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    f = img.astype(np.uint16)
    return ((f[0::2, 0::2] + f[1::2, 0::2] + f[0::2, 1::2] + f[1::2, 1::2] + 2) // 4).astype(np.uint8)
