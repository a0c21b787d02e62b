"""Outputs for QuPath and QC: streamed GeoJSON, a zarr label image, an overlay thumbnail, the run record.

GeoJSON follows QuPath's import rules (checked by ``tests/wsi_fakes.check_qupath_geojson``): one FeatureCollection; each
nucleus a Feature with a UUID ``id``, a valid closed Polygon in level-0 pixels (QuPath frame) with
coordinates rounded to 0.01 px, and ``properties`` holding ``objectType: "detection"``,
``classification: {"name": "Nucleus", "color": [r, g, b]}`` (a typed model: the nucleus's class and its colour)
and a ``measurements`` map. Features are written
one at a time; the collection never exists in memory. Every file is written under a temporary name and renamed
when complete.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pronet_wsi.files import TOOL_MARK, atomic_bytes, commit, mark_owned, open_atomic_stream
from pronet_wsi.instances import Instances

NUCLEUS_CLASS = {"name": "Nucleus", "color": [220, 50, 50]}
_UUID_NAMESPACE = uuid.UUID("6f1c3c1e-5e0b-4a43-9a57-7d1f3b2c9e10")
_CLASS_TEXT = json.dumps(NUCLEUS_CLASS, separators=(",", ":"))


def write_nuclei_csv(path: Path, seg, classes: tuple[str, ...], mpp: float, cells: np.ndarray | None = None) -> None:
    """One row per nucleus of an image's :class:`~pronet_wsi.postprocess.Segmentation`, atomically:
    ``id,x,y,class,class_probability,area_um2``; x, y the centre in the image's continuous frame (pixel
    ``[r, c]`` centred at ``(c + 0.5, r + 0.5)``), class ``Nucleus`` with an empty probability when untyped.
    ``cells``: the (H, W) cell labels (nucleus i grown into cell i), adding a ``cell_area_um2`` column."""
    import csv

    area = np.bincount(seg.labels.ravel().astype(np.int64), minlength=seg.n + 1)[1:] * mpp**2
    index, prob = seg.class_index, seg.class_prob
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", "x", "y", "class", "class_probability", "area_um2", *(["cell_area_um2"] if cells is not None
                                                                                   else [])])
    cell_area = (np.bincount(cells.ravel().astype(np.int64), minlength=seg.n + 1)[1:] * mpp**2 if cells is not None
                 else None)
    for i in range(seg.n):
        r, c = seg.centers_rc[i]
        name = classes[index[i]] if classes and index[i] >= 0 else NUCLEUS_CLASS["name"]
        p = f"{float(prob[i]):.4f}" if classes else ""
        row = [i + 1, f"{c + 0.5:.2f}", f"{r + 0.5:.2f}", name, p, f"{area[i]:.3f}"]
        writer.writerow(row if cell_area is None else [*row, f"{cell_area[i]:.3f}"])
    atomic_bytes(Path(path), buf.getvalue().encode("utf-8"))
    mark_owned(Path(path))


def nucleus_uuid(slide_stem: str, global_id: int) -> str:
    """Deterministic UUID of nucleus ``global_id`` of a slide (the same on every rerun)."""
    return str(uuid.uuid5(_UUID_NAMESPACE, f"{slide_stem}/{global_id}"))


def nucleus_uuids(slide_stem: str, first: int, count: int) -> list[str]:
    """:func:`nucleus_uuid` of ``first, first + 1, ...`` (``count`` of them): the same UUID 5 strings, hashed from
    one SHA-1 state of the namespace and stem (``uuid.uuid5`` per nucleus took 0.3 s of a 54,000-nucleus slide's
    export)."""
    head = hashlib.sha1(_UUID_NAMESPACE.bytes + f"{slide_stem}/".encode(), usedforsecurity=False)
    out = []
    for gid in range(first, first + count):
        h = head.copy()
        h.update(str(gid).encode())
        b = bytearray(h.digest()[:16])
        b[6] = (b[6] & 0x0F) | 0x50  # version 5
        b[8] = (b[8] & 0x3F) | 0x80  # RFC 4122 variant
        x = b.hex()
        out.append(f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}")
    return out


def class_texts(classes: tuple[str, ...], colors: tuple[tuple[int, int, int], ...]) -> list[str]:
    """The ``classification`` JSON text of each class of a typed model (QuPath colours), in class order."""
    return [json.dumps({"name": n, "color": list(c)}, separators=(",", ":"), ensure_ascii=False)
            for n, c in zip(classes, colors, strict=True)]


def feature_bodies(inst: Instances, classes: tuple[str, ...] = (),
                   colors: tuple[tuple[int, int, int], ...] = ()) -> list[str]:
    """Text of each nucleus's Feature after its id: ``,"geometry":{...},"properties":{...}}``.

    ``classes`` / ``colors``: a typed model's class names and QuPath colours; each nucleus is classified by its
    ``class_index`` (an untyped model's nuclei are all ``Nucleus``). Instances with cells become QuPath cells:
    ``objectType: "cell"``, ``geometry`` the cell and ``nucleusGeometry`` the nucleus, as QuPath writes them.
    """
    texts = class_texts(classes, colors) if classes else []
    out = []
    rings, measurements = inst.geometry_texts(), inst.measurement_texts()
    cell_rings = inst.cell_texts() if inst.cell_coords is not None else None
    for i in range(len(inst)):
        cls = texts[int(inst.class_index[i])] if texts and inst.class_index is not None else _CLASS_TEXT
        nucleus = f'{{"type":"Polygon","coordinates":{rings[i]}}}'
        if cell_rings is not None:  # QuPath's cell: the cell outline, and the nucleus beside it
            geometry = (f'{{"type":"Polygon","coordinates":{cell_rings[i]}}},"nucleusGeometry":{nucleus}')
            kind = "cell"
        else:
            geometry, kind = nucleus, "detection"
        out.append(f',"geometry":{geometry},"properties":'
                   f'{{"objectType":"{kind}","classification":{cls},"measurements":{{{measurements[i]}}}}}}}')
    return out


def feature_text(feature_id: str, body: str) -> str:
    return f'{{"type":"Feature","id":"{feature_id}"{body}'


class _CommitOnSuccess:
    """Context manager: ``close()`` (commit) when the block succeeds, ``abort()`` (remove) when it raises."""

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class GeoJSONWriter(_CommitOnSuccess):
    """Stream a FeatureCollection to ``path`` (gzip when ``gzip``); the file appears only on :meth:`close`.

    Use as a context manager: an exception inside the block removes the temporary file.
    """

    def __init__(self, path: Path, gzip_output: bool = False) -> None:
        self.path = Path(path)
        raw, self._tmp = open_atomic_stream(self.path)
        self._raw = raw
        # mtime=0 and no file name: the same features give the same bytes on every run
        self._fh = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) if gzip_output else raw
        self._buf = io.StringIO()
        self.count = 0
        self._fh.write(b'{"type":"FeatureCollection","features":[\n')

    def write(self, feature: str) -> None:
        if self.count:
            self._buf.write(",\n")
        self._buf.write(feature)
        self.count += 1
        if self._buf.tell() > 1 << 20:
            self._flush()

    def _flush(self) -> None:
        self._fh.write(self._buf.getvalue().encode())
        self._buf = io.StringIO()

    def close(self) -> None:
        try:
            self._flush()
            self._fh.write(b"\n]}\n")
            if self._fh is not self._raw:
                self._fh.close()
            self._raw.close()
            commit(self._tmp, self.path)
            mark_owned(self.path)
        except BaseException:  # e.g. a full disk: leave no temporary file behind
            self.abort()
            raise

    def abort(self) -> None:
        try:
            if self._fh is not self._raw:
                self._fh.close()
            self._raw.close()
        finally:
            self._tmp.unlink(missing_ok=True)



def part_path(path: Path, k: int) -> Path:
    """The ``k``-th (1-based) file of a split GeoJSON: ``<stem>.geojson``, ``<stem>.part2.geojson``, ..."""
    path = Path(path)
    if k == 1:
        return path
    suffix = ".geojson.gz" if path.name.endswith(".geojson.gz") else ".geojson"
    stem = path.name[: -len(suffix)] if path.name.endswith(suffix) else path.stem
    return path.with_name(f"{stem}.part{k}{suffix}")


class SplitGeoJSONWriter(_CommitOnSuccess):
    """:class:`GeoJSONWriter` over several files of at most ``max_features`` features each (0 = one file), so
    QuPath can import a slide with millions of nuclei part by part. Every part appears only on :meth:`close`
    (a failed run leaves none), and parts of an earlier run beyond the new last one are removed then."""

    def __init__(self, path: Path, gzip_output: bool = False, max_features: int = 0) -> None:
        self.path, self.gzip, self.max = Path(path), gzip_output, max_features
        self.parts: list[GeoJSONWriter] = [GeoJSONWriter(self.path, gzip_output)]
        self.count = 0

    @property
    def paths(self) -> list[Path]:
        return [w.path for w in self.parts]

    def write(self, feature: str) -> None:
        if self.max and self.parts[-1].count >= self.max:
            self.parts[-1]._flush()
            self.parts.append(GeoJSONWriter(part_path(self.path, len(self.parts) + 1), self.gzip))
        self.parts[-1].write(feature)
        self.count += 1

    def close(self) -> None:
        try:
            for w in self.parts:
                w.close()
        except BaseException:
            self.abort()
            raise
        k = len(self.parts) + 1
        while part_path(self.path, k).exists():  # a previous run split into more parts
            part_path(self.path, k).unlink()
            k += 1

    def abort(self) -> None:
        for w in self.parts:
            if w._tmp.exists():
                w.abort()
            else:  # committed before another part failed: this run wrote it, this run removes it
                w.path.unlink(missing_ok=True)



def read_geojson(path: str | os.PathLike) -> dict:
    """Read a (possibly gzipped) GeoJSON file back (whole, for tests and small files)."""
    path = Path(path)
    with open(path, "rb") as fh:
        magic = fh.read(2)
    opener = gzip.open if magic == b"\x1f\x8b" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return json.load(fh)


class LabelsWriter:
    """A uint32 instance-label image in the processing frame, as a zarr v3 array written chunk by chunk.

    Chunks are the tile cores (``chunk_hw``), so each is written exactly once. Attributes
    record the pixel size and the scale to level 0 (level-0 px per label px).
    """

    def __init__(self, path: Path, shape: tuple[int, int], chunk_hw: tuple[int, int], attrs: dict) -> None:
        import zarr

        self.path = Path(path)
        self._tmp = self.path.with_name(f".{self.path.name}.tmp")
        shutil.rmtree(self._tmp, ignore_errors=True)
        self.array = zarr.create_array(store=str(self._tmp), shape=shape, chunks=tuple(chunk_hw),
                                       dtype="uint32", fill_value=0, zarr_format=3)
        self.array.attrs.update(attrs)

    def write(self, row0: int, col0: int, block: np.ndarray) -> None:
        if block.any():
            self.array[row0 : row0 + block.shape[0], col0 : col0 + block.shape[1]] = block

    def close(self) -> None:
        if self.path.exists():
            shutil.rmtree(self.path)
        os.replace(self._tmp, self.path)
        mark_owned(self.path)

    def abort(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)


class Overlay:
    """A QC thumbnail: the slide with nucleus outlines and the tissue-mask border drawn on it.

    thumbnail : (h, w, 3) uint8; downsample : level-0 px per thumbnail px.
    """

    def __init__(self, thumbnail: np.ndarray, downsample: float, mask: np.ndarray | None = None) -> None:
        self.image = Image.fromarray(np.ascontiguousarray(thumbnail))
        self.downsample = downsample
        self._draw = ImageDraw.Draw(self.image)
        if mask is not None and mask.any():
            from scipy import ndimage as ndi

            mask_img = Image.fromarray(mask.astype(np.uint8) * 255)
            m = np.asarray(mask_img.resize(self.image.size, Image.Resampling.NEAREST)) > 0
            edge = m & ~ndi.binary_erosion(m)
            arr = np.asarray(self.image).copy()
            arr[edge] = (0, 160, 0)
            self.image = Image.fromarray(arr)
            self._draw = ImageDraw.Draw(self.image)

    def add(self, inst: Instances) -> None:
        ds = self.downsample
        for i in range(len(inst)):
            ring = inst.polygon(i) / ds
            if len(ring) >= 3:
                self._draw.line(ring.ravel().tolist(), fill=(20, 20, 220), width=1)

    def save(self, path: Path) -> None:
        atomic_bytes(Path(path), _png_bytes(self.image))
        mark_owned(Path(path))


def _png_bytes(img: Image.Image) -> bytes:
    """PNG at zlib level 1: the 2048 px overlay took 0.49 s at PIL's default level 6 (a quarter of a small
    slide's export) and takes 0.20 s, 3 % larger."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def save_mask_png(path: Path, mask: np.ndarray) -> None:
    """Write a bool mask as a black/white PNG, atomically."""
    atomic_bytes(Path(path), _png_bytes(Image.fromarray(mask.astype(np.uint8) * 255)))
    mark_owned(Path(path))


def write_json(path: Path, record: dict) -> None:
    """Write a run record, marked ``"tool": "pronet-wsi"`` (so a later run knows it may replace it)."""
    atomic_bytes(Path(path), (json.dumps({"tool": TOOL_MARK, **record}, indent=2, default=str) + "\n").encode())
    mark_owned(Path(path))


TISSUE_CLASS = {"name": "Tissue", "color": [60, 160, 60]}


def tissue_annotation(mask: np.ndarray, downsample: float, feature_id: str) -> dict | None:
    """The tissue mask as one QuPath annotation Feature (a valid (Multi)Polygon in level-0 px, QuPath frame).

    ``mask`` (h, w) bool at ``downsample`` level-0 px per pixel. Imported with the detections, QuPath's
    "Objects > Annotations... > Resolve hierarchy" puts every nucleus under it. None when there is no tissue.
    """
    import shapely
    from skimage.measure import find_contours

    padded = np.pad(np.asarray(mask, bool), 1).astype(np.float32)
    geom = shapely.Polygon()
    rings = [shapely.Polygon(c[:, ::-1] - 1 + 0.5) for c in find_contours(padded, 0.5) if len(c) >= 4]
    for ring in sorted((r.buffer(0) for r in rings), key=lambda r: -r.area):  # nested rings alternate: holes
        geom = geom.symmetric_difference(ring)
    geom = shapely.affinity.scale(geom, downsample, downsample, origin=(0, 0))
    geom = shapely.make_valid(shapely.simplify(shapely.set_precision(geom, 0.01), downsample / 2))
    polys = [g for g in getattr(geom, "geoms", [geom]) if g.geom_type in ("Polygon", "MultiPolygon") and g.area]
    if not polys:
        return None
    geom = shapely.set_precision(shapely.union_all(polys), 0.01)
    if not geom.is_valid or geom.is_empty:
        return None
    return {"type": "Feature", "id": feature_id, "geometry": shapely.geometry.mapping(geom),
            "properties": {"objectType": "annotation", "classification": TISSUE_CLASS, "isLocked": False}}


def write_tissue_geojson(path: Path, feature: dict | None) -> None:
    fc = {"type": "FeatureCollection", "features": [feature] if feature else []}
    atomic_bytes(Path(path), (json.dumps(fc, ensure_ascii=False) + "\n").encode())
    mark_owned(Path(path))
