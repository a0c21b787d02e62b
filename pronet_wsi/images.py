"""Plain image files in and out (PNG/TIFF/JPEG): RGB uint8 images and uint32 instance maps."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from pronet_wsi.errors import InputError
from pronet_wsi.files import atomic_write, mark_owned

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
LABEL_SUFFIXES = (".png", ".tif", ".tiff")  # lossless: an instance map cannot be a JPEG


def _read_any(path: Path) -> np.ndarray:
    if not path.exists():
        raise InputError(f"{path}: file not found; check the path")
    if not path.is_file():
        raise InputError(f"{path}: not a file; give an image file or a folder of images")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            return np.asarray(tifffile.imread(path))
        with Image.open(path) as opened:
            im: Image.Image = opened
            if im.mode in ("P", "CMYK", "YCbCr", "LA"):
                im = im.convert("RGBA" if "A" in im.mode or "transparency" in im.info else "RGB")
            return np.asarray(im)
    except InputError:
        raise
    except Exception as exc:  # any decoder failure is a bad file for the user
        raise InputError(f"{path}: cannot be read as an image ({type(exc).__name__}); give PNG, TIFF or JPEG") from exc


def read_image(path: str | os.PathLike, notes: list[str] | None = None) -> np.ndarray:
    """Read an RGB image as (H, W, 3) uint8.

    RGBA is composited on white, 16-bit and float images are rescaled to 8 bits: 16-bit by their real range
    (:func:`sample_max`: 12-bit data in a 16-bit file is scaled by 0-4095, with a line appended to ``notes``).
    Grayscale images are refused because the model needs H&E colour.
    """
    path = Path(path)
    arr = _read_any(path)
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
        arr = np.moveaxis(arr, 0, -1)  # planar TIFF
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 1):
        raise InputError(f"{path}: grayscale image; pronet-wsi needs an RGB (H&E) image")
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise InputError(f"{path}: unsupported image shape {arr.shape}; expected (H, W, 3) RGB or (H, W, 4) RGBA")
    if arr.dtype == np.uint16:
        vmax, note = sample_max(int(arr.max()) if arr.size else 0, *tiff_sample_tags(path))
        if note and notes is not None:
            notes.append(f"{path.name}: {note}")
        arr = scale_uint16(arr, vmax)
    arr = _to_uint8(arr, path)
    if arr.shape[-1] == 4:
        alpha = arr[..., 3:4].astype(np.float32) / 255.0
        rgb = arr[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
        arr = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr[..., :3])


def tiff_sample_tags(path: Path) -> tuple[int | None, int | None]:
    """``(BitsPerSample, MaxSampleValue)`` of a TIFF's first page (None where absent or not a TIFF)."""
    if Path(path).suffix.lower() not in (".tif", ".tiff", ".svs", ".ndpi", ".scn", ".bif"):
        return None, None
    try:
        with tifffile.TiffFile(path) as tf:
            tags = tf.pages.first.tags
            bits, vmax = tags.get("BitsPerSample"), tags.get("MaxSampleValue")

            def first(tag) -> int | None:
                if tag is None:
                    return None
                v = tag.value
                return int(v[0] if isinstance(v, (tuple, list)) else v)

            return first(bits), first(vmax)
    except Exception:  # noqa: BLE001 - tags are a hint; the pixels decide otherwise
        return None, None


def sample_max(observed_max: int, bits: int | None = None, declared_max: int | None = None
               ) -> tuple[int, str | None]:
    """The value that means full intensity in 16-bit data, and a note when it is not 65535.

    The TIFF's MaxSampleValue (or a BitsPerSample below 16) wins; otherwise data whose maximum is below 4096 is
    12-bit (0-4095), the usual camera depth; anything else is scaled by 0-65535 as before.
    """
    if declared_max is not None and 0 < declared_max < 65535 and observed_max <= declared_max:
        return declared_max, f"16-bit pixels scaled by their MaxSampleValue 0-{declared_max}, not 0-65535"
    if bits is not None and 8 < bits < 16 and observed_max < 2**bits:
        return 2**bits - 1, f"{bits}-bit pixels (BitsPerSample) scaled by 0-{2**bits - 1}, not 0-65535"
    if observed_max < 4096:
        return 4095, (f"16-bit pixels up to {observed_max}: read as 12-bit data (0-4095), not 0-65535; convert "
                      f"the image to 8 bits yourself if that is wrong")
    return 65535, None


def scale_uint16(arr: np.ndarray, vmax: int) -> np.ndarray:
    """uint16 ``arr`` with full intensity at ``vmax`` -> uint8 (values above ``vmax`` clip to 255)."""
    return (np.minimum(arr.astype(np.uint32), vmax) * 255 // vmax).astype(np.uint8)


def _to_uint8(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16:
        return (arr.astype(np.uint32) * 255 // 65535).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        scale = 255.0 if float(np.nanmax(arr)) <= 1.0 else 1.0
        return np.clip(np.nan_to_num(arr) * scale, 0, 255).astype(np.uint8)
    raise InputError(f"{path}: unsupported pixel type {arr.dtype}; give an 8- or 16-bit RGB image")


def read_labels(path: str | os.PathLike) -> np.ndarray:
    """Read an instance map (PNG or TIFF, 0 = background) as (H, W) int64."""
    path = Path(path)
    arr = _read_any(path)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        raise InputError(f"{path}: an RGB image, not an instance map; give a single-channel label image")
    if arr.ndim != 2 or not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise InputError(f"{path}: not an instance map (shape {arr.shape}, {arr.dtype}); expected a 2-D integer image")
    return arr.astype(np.int64)


def find_labels(folder: Path, stem: str) -> Path | None:
    """``folder/<stem>.png`` (or ``.tif``, ``.tiff``, in that order) when it exists: the instance map of an image."""
    return next((p for p in (Path(folder) / f"{stem}{s}" for s in LABEL_SUFFIXES) if p.is_file()), None)


def list_images(inputs: list[str | os.PathLike]) -> list[Path]:
    """Expand files and folders into a sorted list of image paths; an empty folder is an error."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file())
            if not found:
                raise InputError(f"{p}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
            out.extend(found)
        elif not p.exists():
            raise InputError(f"{p}: file not found; check the path")
        else:
            out.append(p)
    return out


def write_labels(path: Path, labels: np.ndarray) -> None:
    """Write a uint32 instance map as a zlib-compressed TIFF, atomically."""
    atomic_write(Path(path), lambda tmp: tifffile.imwrite(tmp, labels.astype(np.uint32), compression="zlib"))
    mark_owned(Path(path))


def write_png(path: Path, rgb: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 image as PNG, atomically."""
    atomic_write(Path(path), lambda tmp: Image.fromarray(rgb).save(tmp, format="PNG"))
    mark_owned(Path(path))
