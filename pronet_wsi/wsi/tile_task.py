"""The per-tile task of a whole-slide run: read a batch of tiles, run the model, post-process, save the parts.

:func:`run_batch` is what a tile task runs, in the local thread pool or on a Dask distributed worker; a
:class:`TileJob` carries everything it needs besides the model and pickles small. Each thread keeps its own open
slide handles (backends need not be thread-safe); the model runs as many batches at once as it has
streams (:class:`_ModelSlots`).
"""

from __future__ import annotations

import ctypes
import functools
import threading
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from pronet_wsi.export import feature_bodies
from pronet_wsi.geometry import Box, Frame, rc_to_xy
from pronet_wsi.instances import tile_instances
from pronet_wsi.measurements import MeasureConfig
from pronet_wsi.postprocess import PostprocessConfig, postprocess
from pronet_wsi.slide import Slide, open_slide
from pronet_wsi.tiling import Tile, TilingConfig
from pronet_wsi.wsi.tile_store import TileStore


class _ModelSlots:
    """Model calls running at once in this process: a call starts while fewer than its predictor's
    ``concurrency`` run (OpenVINO streams; 1 for PyTorch, whose threads already use every core)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running = 0

    @contextmanager
    def hold(self, predictor: object):
        limit = max(1, int(getattr(predictor, "concurrency", 1)))
        with self._cond:
            while self._running >= limit:
                self._cond.wait()
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()


_MODEL_SLOTS = _ModelSlots()


@dataclass(frozen=True)
class TileJob:
    """Everything a tile task needs besides the model (picklable, for a Dask cluster).

    post_margin_px : post-process only the tile's core grown by this many px (the candidates' reach plus a
    nucleus, :func:`post_margin_px`), not the whole read box; 0 = the whole read box.
    """

    slide_path: str
    backend: str
    mpp: float
    frame: Frame
    tiling: TilingConfig
    match_radius_px: float
    with_masks: bool
    parts_root: str
    fingerprint: dict
    classes: tuple[str, ...] = ()
    class_colors: tuple[tuple[int, int, int], ...] = ()
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    post_margin_px: float = 0.0


_HANDLES: dict[int, dict[tuple, Slide]] = {}  # thread id -> its open slides, oldest first
_HANDLES_LOCK = threading.Lock()
_KEEP_OPEN = 3  # slides a thread keeps open (a cluster worker sees many slides)


def _thread_slide(job: TileJob) -> Slide:
    """One open slide per (file, thread): backends need not be thread-safe. A thread closes its oldest."""
    key = (job.slide_path, job.backend, job.mpp)
    with _HANDLES_LOCK:
        mine = _HANDLES.setdefault(threading.get_ident(), {})
        slide = mine.get(key)
    if slide is None:
        slide = open_slide(job.slide_path, job.backend, job.mpp)
        with _HANDLES_LOCK:
            mine[key] = slide
            stale = [mine.pop(k) for k in list(mine)[:-_KEEP_OPEN]]
        for old in stale:
            old.close()
    return slide


def close_slides(path: str) -> None:
    """Close the handles on ``path`` of this thread and of threads that have ended (a finished run's pool).

    A live thread's handle is left to that thread (it may be reading: an in-process Dask worker still running a
    task of a failed run); it is closed when the thread drops it for a newer slide.
    """
    live = {t.ident for t in threading.enumerate()} - {threading.get_ident()}
    with _HANDLES_LOCK:
        stale = [mine.pop(k) for tid, mine in _HANDLES.items() if tid not in live
                 for k in [k for k in mine if k[0] == path]]
        for tid in [tid for tid, mine in _HANDLES.items() if not mine]:
            del _HANDLES[tid]
    for slide in stale:
        slide.close()


class TileModel(Protocol):
    """What the run layer needs of a model (a ``Predictor``, a Dask ``ModelSpec``, or a test's oracle).

    mpp : the model's pixel size (um). context_px : the tile halo it needs for seam-exact maps. An optional
    ``stride`` (the network's, default 16) aligns the tile grid.
    predict_batch : (B, H, W, 3) uint8 tiles -> maps ``foreground`` (B, H, W), ``offsets`` (B, 2, H, W),
    ``centers`` (B, H, W), and ``types`` (B, K, H, W) class probabilities for a typed model (one whose
    ``classes`` attribute names K classes; a model without the attribute is untyped).
    """

    @property
    def mpp(self) -> float: ...

    @property
    def context_px(self) -> int: ...

    @property
    def postprocess_config(self) -> PostprocessConfig: ...

    def predict_batch(self, tiles: np.ndarray) -> dict[str, np.ndarray]: ...


def run_batch(job: TileJob, tiles: Sequence[Tile], predictor: TileModel, on_tile_done=None) -> list[dict]:
    """Read, predict, post-process and save a batch of tiles; returns one stats dict per tile."""
    slide = _thread_slide(job)
    t0 = time.perf_counter()
    images = [slide.read_box(job.frame.box_to_level0(t.read), t.read.shape) for t in tiles]
    t_read = time.perf_counter()
    with _MODEL_SLOTS.hold(predictor):
        t1 = time.perf_counter()  # after the wait for the model: waiting is neither reading nor predicting
        maps = _predict_by_shape(predictor, images)
        t2 = time.perf_counter()
    config = predictor.postprocess_config
    # stain measurements and a nucleus classifier need the pixels
    pixels = images if job.measure.level == "all" or config.nucleus_classifier is not None else None
    del images
    store = TileStore(Path(job.parts_root))
    out = []
    for k, tile in enumerate(tiles):
        t3 = time.perf_counter()
        box = post_box(tile, job.post_margin_px)
        tile_maps, image = _crop(maps[k], None if pixels is None else pixels[k], tile.read, box)
        seg = postprocess(tile_maps, config, image)
        cut = _cut_at_edge(seg, box, tile.core, job.match_radius_px)
        if cut and box != tile.read:  # a nucleus larger than the margin: the whole read box, as without one
            box = tile.read
            tile_maps, image = _crop(maps[k], None if pixels is None else pixels[k], tile.read, box)
            seg = postprocess(tile_maps, config, image)
            cut = _cut_at_edge(seg, box, tile.core, job.match_radius_px)
        t4 = time.perf_counter()
        inst = tile_instances(seg, tile_maps["foreground"], box, tile.core, job.frame, predictor.mpp,
                              job.match_radius_px, with_masks=job.with_masks, image=image, measure=job.measure)
        bodies = feature_bodies(inst, job.classes, job.class_colors)
        t5 = time.perf_counter()
        stats = {"candidates": len(inst), "in_core": int(inst.in_core.sum()), "cut_at_edge": cut,
                 "read_s": (t_read - t0) / len(tiles), "wait_s": (t1 - t_read) / len(tiles),
                 "predict_s": (t2 - t1) / len(tiles),
                 "postprocess_s": t4 - t3, "polygons_s": t5 - t4}
        t6 = time.perf_counter()
        store.save(tile.key, inst, bodies, stats)
        stats["save_s"] = time.perf_counter() - t6
        out.append({"key": tile.key, **stats})
        if on_tile_done is not None:
            on_tile_done(tile.key)
    del maps, pixels
    release_free_memory()
    return out


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim`` (None elsewhere: musl, macOS, Windows)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Hand the heap's free pages back to the system after a batch. Tile threads allocate in several malloc
    arenas, whose free pages otherwise stay counted in the process: on the 1 Gpx benchmark slide peak RSS grew
    by ~0.2 GB over a run without it (benchmarks/RESULTS.md)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _predict_by_shape(predictor: TileModel, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Maps per image; images of one shape share a model call (tiles cropped to tissue differ in shape)."""
    out: list[dict[str, np.ndarray]] = [{} for _ in images]
    for shape in dict.fromkeys(im.shape for im in images):
        idx = [i for i, im in enumerate(images) if im.shape == shape]
        maps = predictor.predict_batch(np.stack([images[i] for i in idx]))
        for j, i in enumerate(idx):
            out[i] = {name: m[j] for name, m in maps.items()}
    return out


# How far (um) a nucleus reaches beyond its centre, for the post-processing window. In the four labs' labels the
# farthest pixel from a nucleus's centroid is <= 10.6-12.4 um for 99.9 % of nuclei (max 23.7); a tile whose window
# still cuts a candidate is post-processed on its whole read box.
NUCLEUS_REACH_UM = 16.0


def post_margin_px(match_radius_px: float, cells_um: float, mpp: float, classifier_reach_um: float = 0.0) -> float:
    """Margin (processing px) around a tile's core that post-processing must see so that every candidate (centre
    within the match radius of the core) is whole, and with cells, every neighbour its cell competes with, and with
    a nucleus classifier on the neighbourhood, every neighbour within its reach."""
    return match_radius_px + (max(2 * cells_um, classifier_reach_um) + NUCLEUS_REACH_UM) / mpp


def post_box(tile: Tile, margin_px: float) -> Box:
    """The part of the tile's read box that post-processing sees: its core grown by ``margin_px`` (0 = all of
    it). The halo beyond it gave the network its context; no candidate lies there."""
    if margin_px <= 0:
        return tile.read
    return tile.core.expand(float(np.ceil(margin_px))).intersect(tile.read)


def _crop(maps: dict[str, np.ndarray], image: np.ndarray | None, read: Box, box: Box):
    """The tile's maps and pixels inside ``box`` (views)."""
    if box == read:
        return maps, image
    r0, c0 = int(box.y0 - read.y0), int(box.x0 - read.x0)
    h, w = box.shape
    cropped = {name: m[..., r0 : r0 + h, c0 : c0 + w] for name, m in maps.items()}
    return cropped, None if image is None else image[r0 : r0 + h, c0 : c0 + w]


def _cut_at_edge(seg, box: Box, core: Box, radius: float) -> int:
    """How many candidates (centre within ``radius`` of ``core``) touch the edge of ``box``, the array ``seg``
    covers (the halo, or the post-processing margin, was too small for them)."""
    if seg.n == 0:
        return 0
    lab = seg.labels
    edge = np.zeros(seg.n + 1, bool)
    edge[np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]).astype(np.int64)] = True
    centers_p = rc_to_xy(seg.centers_rc, (box.x0, box.y0))
    return int((edge[1:] & core.expand(radius).contains_xy(centers_p)).sum())


class ThreadExecutor:
    """Runs tile batches (:func:`run_batch`) on a local pool of ``n_workers`` threads; knows nothing of slides.

    The executor interface :func:`pronet_wsi.wsi.pipeline.run_slides` drives (``cluster.DaskExecutor`` is the
    other): ``submit`` a batch -> a future with ``add_done_callback``, ``result`` of a finished one, ``cancel``
    the ones not yet finished (returning only when none of them runs any more), ``capacity`` (batches that run
    at once) and ``close``.
    """

    def __init__(self, n_workers: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.n_workers = n_workers
        self._pool = ThreadPoolExecutor(n_workers, thread_name_prefix="pronet-tile")

    def submit(self, job: TileJob, batch: Sequence[Tile], predictor: TileModel, on_tile_done=None):
        return self._pool.submit(run_batch, job, batch, predictor, on_tile_done)

    @staticmethod
    def result(future) -> list[dict]:
        return future.result()

    def cancel(self, futures) -> None:
        """Cancel the batches not started and wait for the running ones: nothing reads or writes afterwards."""
        from concurrent.futures import wait

        for f in futures:
            f.cancel()
        wait(futures)

    def capacity(self) -> int:
        return self.n_workers

    def close(self) -> None:
        """End the threads (their open slides are closed by :func:`close_slides`)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
