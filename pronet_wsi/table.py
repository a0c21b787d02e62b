"""``<stem>_nuclei.parquet``: one row per nucleus for analysis (pandas, geopandas, R), streamed in row groups.

Columns: ``id`` (the GeoJSON feature id), ``centroid_x_px`` / ``centroid_y_px`` (the outline's centroid, level-0
continuous px) and ``centroid_x_um`` / ``centroid_y_um``, ``class`` and ``class_probability`` (NaN for an untyped
model), every measurement under its GeoJSON name, ``geometry`` (the nucleus outline as WKB, exactly the polygon
the GeoJSON holds) and, with cells, ``cell_geometry``. The file carries GeoParquet 1.0 metadata (primary column
``geometry``, no CRS: slide pixels), so ``geopandas.read_parquet`` gives a GeoDataFrame.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import shapely

from pronet_wsi.files import commit, open_atomic_stream
from pronet_wsi.instances import MEASUREMENT_NAMES, Instances, valid_rounded_ring

ROW_GROUP = 65536
BASE_MEASUREMENTS = (MEASUREMENT_NAMES["area_um2"], MEASUREMENT_NAMES["area_px"], MEASUREMENT_NAMES["center_score"],
                     MEASUREMENT_NAMES["foreground_mean"])


def _schema(feature_names: tuple[str, ...], cells: bool):
    import pyarrow as pa

    fields = [pa.field("id", pa.string()), *(pa.field(c, pa.float64()) for c in
              ("centroid_x_px", "centroid_y_px", "centroid_x_um", "centroid_y_um")),
              pa.field("class", pa.string()), pa.field("class_probability", pa.float32()),
              *(pa.field(n, pa.float64()) for n in (*BASE_MEASUREMENTS, *feature_names)),
              pa.field("geometry", pa.binary())]
    if cells:
        fields.append(pa.field("cell_geometry", pa.binary()))
    columns = {"geometry": {"encoding": "WKB", "geometry_types": ["Polygon"], "crs": None}}
    if cells:
        columns["cell_geometry"] = {"encoding": "WKB", "geometry_types": ["Polygon"], "crs": None}
    geo = {"version": "1.0.0", "primary_column": "geometry", "columns": columns}
    return pa.schema(fields, metadata={b"geo": json.dumps(geo).encode()})


class NucleiTableWriter:
    """Stream nuclei to a Parquet file in row groups; the file appears (atomically) on :meth:`close`.

    Parameters
    ----------
    path : the ``.parquet`` file. um_per_px : level-0 pixel size. feature_names : the measurement columns beyond
        the four every nucleus has. classes : a typed model's class names (() = every nucleus ``Nucleus``).
    cells : also write ``cell_geometry``.
    """

    def __init__(self, path: Path, um_per_px: float, feature_names: tuple[str, ...], classes: tuple[str, ...] = (),
                 cells: bool = False) -> None:
        import pyarrow.parquet as pq

        self.path, self.um_per_px, self.names, self.classes, self.cells = Path(path), um_per_px, feature_names, \
            classes, cells
        self.schema = _schema(feature_names, cells)
        self._raw, self._tmp = open_atomic_stream(self.path)
        self._writer = pq.ParquetWriter(self._raw, self.schema, compression="zstd")
        self._rows: list = []
        self._n = 0
        self.count = 0

    def add(self, ids: list[str], inst: Instances) -> None:
        """Rows for ``inst`` (the kept nuclei of one tile), ``ids`` their feature ids."""
        if not len(inst):
            return
        polys = np.array([shapely.Polygon(valid_rounded_ring(inst.polygon(i))) for i in range(len(inst))], object)
        cent = shapely.get_coordinates(shapely.centroid(polys))
        cols: dict = {"id": ids, "centroid_x_px": cent[:, 0], "centroid_y_px": cent[:, 1],
                      "centroid_x_um": cent[:, 0] * self.um_per_px, "centroid_y_um": cent[:, 1] * self.um_per_px}
        if self.classes and inst.class_index is not None and inst.class_prob is not None:
            cols["class"] = [self.classes[int(c)] for c in inst.class_index]
            cols["class_probability"] = inst.class_prob.astype(np.float32)
        else:
            cols["class"] = ["Nucleus"] * len(inst)
            cols["class_probability"] = np.full(len(inst), np.nan, np.float32)
        for name, v in zip(BASE_MEASUREMENTS, (inst.area_um2, inst.area_px, inst.center_score, inst.foreground_mean),
                           strict=True):
            cols[name] = np.asarray(v, np.float64)
        for name in self.names:
            if inst.features is not None and name in inst.feature_names:
                cols[name] = inst.features[:, inst.feature_names.index(name)]
            else:
                cols[name] = np.full(len(inst), np.nan)
        cols["geometry"] = shapely.to_wkb(polys)
        if self.cells:
            cells = np.array([shapely.Polygon(valid_rounded_ring(inst.cell(i))) for i in range(len(inst))], object)
            cols["cell_geometry"] = shapely.to_wkb(cells)
        self._rows.append(cols)
        self._n += len(inst)
        self.count += len(inst)
        if self._n >= ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if not self._rows:
            return
        joined = {f.name: np.concatenate([np.asarray(r[f.name], object if f.name in ("id", "class") else None)
                                          for r in self._rows]) for f in self.schema}
        self._writer.write_table(pa.Table.from_pydict(joined, schema=self.schema))
        self._rows, self._n = [], 0

    def close(self) -> None:
        try:
            self._flush()
            self._writer.close()
            self._raw.close()
            commit(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        try:
            try:
                self._writer.close()
            except (OSError, ValueError):  # already closed, or the disk failed
                pass
            self._raw.close()
        finally:
            self._tmp.unlink(missing_ok=True)


def table_means(path: Path) -> dict[str, float]:
    """Per-slide means of the numeric measurement columns of a nuclei table (NaN ignored), by column name."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    skip = {"centroid_x_px", "centroid_y_px", "centroid_x_um", "centroid_y_um"}
    names = [f.name for f in schema if f.type in ("double", "float") and f.name not in skip]
    out = {}
    pf = pq.ParquetFile(path)
    sums = dict.fromkeys(names, 0.0)
    counts = dict.fromkeys(names, 0)
    for i in range(pf.num_row_groups):  # one row group at a time: memory stays flat
        t = pf.read_row_group(i, columns=names)
        for n in names:
            col = pc.drop_null(pc.if_else(pc.is_nan(t[n]), None, t[n]))
            sums[n] += float(pc.sum(col).as_py() or 0.0)
            counts[n] += len(col)
    for n in names:
        out[n] = sums[n] / counts[n] if counts[n] else float("nan")
    return out
