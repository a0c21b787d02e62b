"""What a whole-slide run decides before its tiles run, and what it reports after: plain data, no work.

:class:`SegmentConfig` holds the run's settings; :func:`pronet_wsi.wsi.pipeline.prepare_slide` turns a slide into a
frozen :class:`SlidePlan` (the slide as read, its overview and tissue, the tile grid and the tiles still to run,
the model's identity, the output paths); the tile executors and :func:`pronet_wsi.wsi.assemble.write_outputs`
read only the plan; the only thing that changes while a slide runs is its :class:`RunLog`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pronet_wsi.errors import InputError
from pronet_wsi.files import OutputLock, OutputPaths
from pronet_wsi.geometry import Frame
from pronet_wsi.measurements import MeasureConfig
from pronet_wsi.stitching import StitchConfig
from pronet_wsi.tiling import Tile, TileGrid, TilingConfig
from pronet_wsi.tissue import TissueConfig
from pronet_wsi.wsi.tile_task import TileJob


@dataclass(frozen=True)
class SegmentConfig:
    """Settings of a whole-slide run (besides the model).

    batch_size : tiles per model call, the one owner of that number for a slide (a default tile is 3.2 Mpx,
        see below; raise it on a large GPU).
    workers : tile threads (0 = CPU count + 1, at most 9).
    use_tissue_mask : skip glass. gzip : write ``.geojson.gz``. labels_zarr : also write the label image.
    tissue_geojson : also write ``<stem>_tissue.geojson``, the tissue region as a QuPath annotation.
    overwrite : redo a slide whose output exists. overlay_max_px : long side of the overlay PNG (also the
    image the tissue mask is computed on).
    measure : QuPath measurements per nucleus (``level``) and cells (``cells_um``, 0 = none).
    parquet : also write ``<stem>_nuclei.parquet``, one row per nucleus.
    max_features_per_file : split the GeoJSON into ``<stem>.geojson``, ``<stem>.part2.geojson``, ... of at most
        this many features each (0 = one file).
    crop_glass : tiles at the tissue's edge read only the tissue's bounding box plus the halo (with the tissue
        mask; same nuclei, fewer model pixels; see :mod:`pronet_wsi.glass`).

    >>> config = SegmentConfig()
    >>> config.batch_size, config.tiling.tile_px, round(config.tiling.tile_px ** 2 / 1e6, 1)  # Mpx per tile
    (1, 1792, 3.2)
    """

    tiling: TilingConfig = field(default_factory=TilingConfig)
    tissue: TissueConfig = field(default_factory=TissueConfig)
    stitch: StitchConfig = field(default_factory=StitchConfig)
    use_tissue_mask: bool = True
    batch_size: int = 1
    workers: int = 0
    gzip: bool = False
    labels_zarr: bool = False
    tissue_geojson: bool = False
    overwrite: bool = False
    overlay_max_px: int = 2048
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    parquet: bool = False
    max_features_per_file: int = 0
    crop_glass: bool = True

    def __post_init__(self) -> None:
        if self.max_features_per_file < 0:
            raise InputError(f"max_features_per_file={self.max_features_per_file}: must be >= 0 (0 = one file)")
        if not 1 <= self.batch_size <= 256:
            raise InputError(f"batch_size={self.batch_size}: must be between 1 and 256")
        if self.overlay_max_px < 64:
            raise InputError(f"overlay_max_px={self.overlay_max_px}: must be >= 64")
        if not 0 <= self.workers <= 256:
            raise InputError(f"workers={self.workers}: must be between 0 (auto) and 256")
        if self.tiling.halo_px < 2 * self.stitch.match_radius_px:
            raise InputError(f"halo_px={self.tiling.halo_px}: must be at least twice the match radius "
                             f"({self.stitch.match_radius_px} px) so both tiles see a nucleus on their seam")

    @property
    def n_workers(self) -> int:
        return self.workers or min(9, (os.cpu_count() or 1) + 1)


@dataclass(frozen=True)
class SlideSource:
    """The slide as this run reads it: file, output stem, pixel size (um), backend and its properties."""

    path: Path
    name: str
    mpp: float
    backend: str
    info: dict


@dataclass(frozen=True)
class Overview:
    """The slide at a glance: ``thumb`` (h, w, 3) uint8, ``ds`` level-0 px per thumbnail px, and the tissue
    ``mask`` (h, w) bool on it (None: every pixel counts as tissue)."""

    thumb: np.ndarray
    ds: float
    mask: np.ndarray | None

    def tissue_mm2(self, slide_mpp: float, level0_shape: tuple[int, int]) -> float:
        if self.mask is None:
            return level0_shape[0] * level0_shape[1] * slide_mpp**2 / 1e6
        return float(self.mask.sum()) * (self.ds * slide_mpp) ** 2 / 1e6


@dataclass(frozen=True)
class ModelInfo:
    """Which model made the nuclei: ``id`` (by content: weights sha256, network, thresholds), its ``mpp``,
    post-processing settings, for a typed model its nucleus ``classes``, and ``forward``: the engine and graph that
    ran it (``torch``, ``openvino``, or ``openvino int8 <the graph's sha256, 16 hex>``)."""

    id: str
    mpp: float
    postprocess: dict
    classes: tuple[str, ...] = ()
    forward: str = ""


@dataclass
class RunLog:
    """What a run records as it goes: stage times (s) and warnings, from ``t_start`` (``time.perf_counter``)."""

    t_start: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SlidePlan:
    """A slide opened, its tissue found and its tiles chosen: all the tile tasks and the assembly need.

    ``tiles`` are every tile with tissue in raster order; ``batches`` the ones still to run, ``batch_size`` at a
    time (finished parts of an earlier run are not redone). ``lock`` is this run's hold on the slide's outputs.
    """

    slide: SlideSource
    paths: OutputPaths
    config: SegmentConfig
    model: ModelInfo
    frame: Frame
    grid: TileGrid
    tiles: tuple[Tile, ...]
    batches: tuple[tuple[Tile, ...], ...]
    overview: Overview
    job: TileJob
    log: RunLog
    lock: OutputLock | None = None

    @property
    def n_resumed(self) -> int:
        """Tiles finished by an earlier run."""
        return len(self.tiles) - sum(len(b) for b in self.batches)

    @property
    def core_mpx(self) -> dict[str, float]:
        """Mpx (at the model's mpp) of each tile's core, by tile key."""
        return {t.key: t.core.area / 1e6 for t in self.tiles}

    def release(self) -> None:
        """Let other runs write this slide's outputs again (after finishing or failing)."""
        if self.lock is not None:
            self.lock.release()


@dataclass
class SlideResult:
    """What happened to one slide. ``status`` is ``done`` or ``skipped``; ``name`` is the output stem."""

    slide: Path
    status: str
    geojson: Path
    n_nuclei: int = 0
    n_tiles: int = 0
    n_tiles_resumed: int = 0
    mpx: float = 0.0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    name: str = ""

    def summary(self) -> str:
        if self.status == "skipped":
            return f"{self.slide.name}: skipped, {self.geojson} exists (use --overwrite to redo it)"
        rate = self.mpx / self.seconds if self.seconds > 0 else 0.0
        resumed = f" ({self.n_tiles_resumed} resumed)" if self.n_tiles_resumed else ""
        return (f"{self.slide.name}: {self.n_nuclei:,} nuclei in {self.n_tiles} tiles{resumed}, "
                f"{self.mpx:.1f} Mpx in {self.seconds:.1f} s ({rate:.2f} Mpx/s) -> {self.geojson}")
