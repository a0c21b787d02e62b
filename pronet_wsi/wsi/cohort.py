"""Cohorts of slides: which slides (manifest, glob, shard), running them one by one or on a cluster, the summary.

* :func:`read_manifest` reads a CSV of slides (``path``, optional ``mpp`` and ``output`` name); a bad line is
  an InputError naming the file and the line. :func:`expand_inputs` expands glob patterns.
* :func:`select_shard` keeps every N-th slide from the I-th, so the tasks of a SLURM job array split a cohort
  without talking to each other; finished slides are skipped on a rerun (by
  :func:`~pronet_wsi.wsi.pipeline.segment_slide`).
* :func:`segment_batch` runs the slides, each isolated: a slide that fails gets a run record ``<name>.json``
  with ``status: "failed"`` and the error (and no GeoJSON), and the others go on.
* :func:`summary_rows` merges the run records of an output folder into one table (``pronet-wsi summary``).
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pronet_wsi.errors import InputError, bug_message
from pronet_wsi.export import write_json
from pronet_wsi.files import LockHeld, OutputPaths, atomic_bytes, check_outputs, check_report, slide_stem
from pronet_wsi.slide import MPP_RANGE, plausible_mpp
from pronet_wsi.wsi.pipeline import segment_slide
from pronet_wsi.wsi.plan import SegmentConfig, SlideResult

log = logging.getLogger(__name__)

PATH_COLUMNS = ("path", "slide")
OUTPUT_COLUMNS = ("output", "name")
SUMMARY_COLUMNS = ("name", "slide", "status", "error", "nuclei", "tissue_area_mm2", "nuclei_per_mm2",
                   "mean_area_um2", "wall_time_s", "mpx_per_s")


@dataclass(frozen=True)
class SlideItem:
    """One slide of a cohort: its file, its mpp when the file lacks it (None: the slide's own), its output name.

    ``source`` says where it was listed (``slides.csv line 4``) for messages.
    """

    path: Path
    mpp: float | None = None
    name: str | None = None
    source: str = ""

    @property
    def stem(self) -> str:
        """The output file stem: ``name`` or the slide's file name without its extension."""
        return self.name or slide_stem(self.path)


# -- which slides -------------------------------------------------------------------------------------------------
def read_manifest(path: str | os.PathLike) -> list[SlideItem]:
    """Slides listed in a CSV: a header with ``path`` (or ``slide``) and optionally ``mpp`` and ``output`` (or
    ``name``) columns (other columns are ignored), or no header and ``path[,mpp[,output]]`` per line.

    Relative paths are relative to the manifest's folder; blank lines and lines starting with ``#`` are skipped.
    Raises InputError naming the manifest and the line: unreadable file, no slides, an empty path, an mpp that
    is not a pixel size, an output name that is not a plain name or is used twice.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as exc:
        raise InputError(f"{path}: manifest not found; give a CSV file with a path column") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: manifest cannot be read ({type(exc).__name__}); give a UTF-8 CSV file") from exc
    reader = csv.reader(io.StringIO(text))
    columns: dict[str, int] | None = None
    n_header = 0
    items: list[SlideItem] = []
    first_use: dict[str, int] = {}
    try:
        for row in reader:
            line = reader.line_num
            cells = [c.strip() for c in row]
            if not any(cells) or cells[0].startswith("#"):
                continue
            where = f"{path} line {line}"
            if columns is None:
                columns, n_header = _columns(cells, where)
                if n_header:
                    continue
            if n_header and len(cells) > n_header and any(cells[n_header:]):
                raise InputError(f"{where}: {len(cells)} fields but the header has {n_header}; quote paths that "
                                 f"contain commas")
            if not n_header and len(cells) > 3:
                raise InputError(f"{where}: {len(cells)} fields; without a header a line is path[,mpp[,output]] "
                                 f"(add a header row to use more columns)")
            item = _item(cells, columns, path.parent, where)
            if item.stem in first_use:
                raise InputError(f"{where}: output name {item.stem!r} is also that of line {first_use[item.stem]}; "
                                 f"give one of them another name in an output column")
            first_use[item.stem] = line
            items.append(item)
    except csv.Error as exc:
        raise InputError(f"{path} line {reader.line_num}: not valid CSV ({exc})") from exc
    if not items:
        raise InputError(f"{path}: the manifest lists no slides; add one slide path per line")
    return items


def _columns(cells: list[str], where: str) -> tuple[dict[str, int], int]:
    """Column indices from a header row (and its width), or the positional layout (width 0) for a data row."""
    names = [c.lower() for c in cells]
    if not any(n in PATH_COLUMNS for n in names):
        return {"path": 0, "mpp": 1, "output": 2}, 0
    index: dict[str, int] = {}
    for i, n in enumerate(names):
        key = "path" if n in PATH_COLUMNS else "output" if n in OUTPUT_COLUMNS else n if n == "mpp" else None
        if key is not None:
            if key in index:
                raise InputError(f"{where}: two {key} columns in the header; keep one")
            index[key] = i
    return index, len(cells)


def _item(cells: list[str], columns: dict[str, int], root: Path, where: str) -> SlideItem:
    def cell(key: str) -> str:
        i = columns.get(key)
        return cells[i] if i is not None and i < len(cells) else ""

    raw = cell("path")
    if not raw:
        raise InputError(f"{where}: empty path; every line needs the slide's file")
    mpp = None
    if cell("mpp"):
        try:
            mpp = float(cell("mpp"))
        except ValueError:
            mpp = float("nan")
        if not plausible_mpp(mpp):
            raise InputError(f"{where}: mpp {cell('mpp')!r} is not a pixel size in um between {MPP_RANGE[0]} and "
                             f"{MPP_RANGE[1]}; leave it empty to use the slide's own")
    name = cell("output") or None
    if name is not None and (name in (".", "..") or name.startswith(".") or re.search(r"[/\\\x00]", name)):
        raise InputError(f"{where}: output name {name!r} must be a plain file name without folders or a leading "
                         f"dot")
    p = Path(raw).expanduser()
    return SlideItem(p if p.is_absolute() else root / p, mpp, name, where)


def expand_inputs(args: Iterable[str | os.PathLike]) -> list[SlideItem]:
    """Slide arguments as given, glob patterns (``*``, ``?``, ``[...]``, ``**``) expanded to their sorted files.

    A pattern that is not itself an existing file and matches no file is an InputError.
    """
    items: list[SlideItem] = []
    for arg in args:
        text = str(arg)
        if re.search(r"[*?[]", text) and not Path(text).exists():
            matches = sorted(m for m in glob.glob(os.path.expanduser(text), recursive=True) if Path(m).is_file())
            if not matches:
                raise InputError(f"{text}: no file matches this pattern; check it (and quote it so that the shell "
                                 f"leaves it to pronet-wsi)")
            items.extend(SlideItem(Path(m), source=text) for m in matches)
        else:
            items.append(SlideItem(Path(text)))
    return items


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N`` (InputError otherwise)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise InputError(f"--shard {text!r}: write I/N, e.g. 0/4 for the first of four shards")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or i >= n:
        raise InputError(f"--shard {text}: need 0 <= I < N (shards are numbered 0 to N-1; in a SLURM array use "
                         f"--array=0-{max(n - 1, 0)})")
    return i, n


def select_shard(items: list, index: int, count: int) -> list:
    """Every ``count``-th item starting at ``index`` (the shards ``0..count-1`` cover ``items`` exactly once)."""
    return list(items[index::count])


def duplicates(items: list[SlideItem]) -> dict[int, SlideItem]:
    """``{index: earlier item}`` for each item whose output name an earlier item already has."""
    seen: dict[str, SlideItem] = {}
    dups = {}
    for i, item in enumerate(items):
        if item.stem in seen:
            if Path(item.path).resolve() != Path(seen[item.stem].path).resolve():
                dups[i] = seen[item.stem]
        else:
            seen[item.stem] = item
    return dups


# -- running them -------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """One slide of a batch: its result, or the one-line error it failed with."""

    item: SlideItem
    result: SlideResult | None = None
    error: str | None = None


def error_message(exc: BaseException) -> str:
    """A one-line message for an exception: bad input (InputError) and OS errors as they are; anything else is a
    bug, named by its type with the hint to rerun with -v for the traceback (logged at debug level)."""
    if isinstance(exc, OSError) and exc.strerror:
        from pronet_wsi.files import describe_os_error

        return describe_os_error(exc)
    msg = str(exc).splitlines()[0] if str(exc) else ""
    if isinstance(exc, (InputError, OSError)):
        return msg or type(exc).__name__
    return bug_message(exc)


def segment_batch(items: Iterable[SlideItem], out_dir: str | os.PathLike, predictor,
                  config: SegmentConfig = SegmentConfig(), *, client=None, backend: str = "auto",
                  default_mpp: float | None = None, pin_gpus: bool = False, progress: bool = False
                  ) -> Iterator[Outcome]:
    """Segment slides one by one (``client`` None: :func:`~pronet_wsi.wsi.pipeline.segment_slide` each, on a local
    thread pool) or all at once on the Dask cluster of ``client``
    (:func:`~pronet_wsi.wsi.pipeline.run_slides` with a :class:`~pronet_wsi.wsi.cluster.DaskExecutor`); yields an
    :class:`Outcome` as each slide ends.

    A failing slide (any ``Exception``) is isolated: it gets a failure record and the batch goes on. No output
    replaces one of the slides of ``items`` (inputs are never outputs) or a file pronet-wsi did not write.
    """
    out_dir = Path(out_dir)
    items = list(items)
    inputs = [Path(it.path) for it in items]
    started = time.time()
    if client is not None:
        from pronet_wsi.wsi.cluster import DaskExecutor
        from pronet_wsi.wsi.pipeline import run_slides

        executor = DaskExecutor(client, pin_gpus)
        for item, res in run_slides(items, out_dir, predictor, config, executor, backend=backend,
                                    default_mpp=default_mpp, progress=progress, inputs=inputs):
            if isinstance(res, BaseException):
                yield _failed(item, res, out_dir, config, started, inputs)
            else:
                yield Outcome(item, res)
        return
    for item in items:
        started = time.time()
        try:
            res = segment_slide(item.path, out_dir, predictor, config, backend=backend,
                                mpp=item.mpp if item.mpp is not None else default_mpp, name=item.name,
                                progress=progress, inputs=inputs)
        except Exception as exc:  # one bad slide is recorded and the others go on
            yield _failed(item, exc, out_dir, config, started, inputs)
            continue
        yield Outcome(item, res)


def _failed(item: SlideItem, exc: BaseException, out_dir: Path, config: SegmentConfig, started: float,
            inputs: list[Path] | None = None) -> Outcome:
    log.debug("segment %s failed", item.path, exc_info=exc)
    msg = error_message(exc)
    if isinstance(exc, LockHeld):  # another run owns this slide's outputs: touch nothing
        return Outcome(item, None, msg)
    write_failure_record(OutputPaths.of(item.path, out_dir, config.gzip, item.stem), item, msg, type(exc).__name__,
                         started, [item.path, *(inputs or [])])
    return Outcome(item, None, msg)


def write_failure_record(paths: OutputPaths, item: SlideItem, message: str, error_type: str,
                         started: float, inputs: list[Path] | None = None) -> None:
    """Record a failed slide in ``<name>.json`` (``status: "failed"``, the error), written atomically.

    Nothing else is touched: a run removes only what it wrote itself (a GeoJSON whose record could not be
    written, in :func:`~pronet_wsi.wsi.pipeline.finish_slide`). The per-tile parts stay, so a rerun resumes.
    No record replaces an input, a file pronet-wsi did not write, or the record of a finished slide (its
    GeoJSON exists). Unwritable folder: no record.
    """
    from pronet_wsi.wsi.pipeline import is_finished

    try:
        check_outputs([paths.record], list(inputs or [item.path]))
    except InputError:
        return
    if is_finished(paths):
        return
    try:
        write_json(paths.record, {
            "status": "failed", "name": item.stem, "slide": {"path": str(item.path)}, "error": message,
            "error_type": error_type, "source": item.source,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    except OSError:
        pass


# -- the summary --------------------------------------------------------------------------------------------------
def summary_rows(out_dir: str | os.PathLike, manifest: list[SlideItem] | None = None) -> list[dict]:
    """One row per run record ``<name>.json`` in ``out_dir`` (columns :data:`SUMMARY_COLUMNS`).

    With ``manifest``, rows follow its order and a listed slide without a record is ``missing`` (not run, or
    its job was killed); records of slides not in the manifest come after. An unparsable record is
    ``unreadable``; JSON files that are not run records are ignored.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise InputError(f"{out_dir}: not a folder; give the output folder of pronet-wsi segment")
    rows: dict[str, dict] = {}
    for p in sorted(out_dir.glob("*.json")):
        try:
            rec = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            rows[p.stem] = _row(p.stem, "", "unreadable", f"{p.name}: not a readable run record ({exc})")
            continue
        if isinstance(rec, dict) and rec.get("status") in ("done", "failed") and isinstance(rec.get("slide"), dict):
            rows[p.stem] = _record_row(p.stem, rec)
    if manifest is None:
        return list(rows.values())
    ordered = []
    for item in manifest:
        row = rows.pop(item.stem, None)
        ordered.append(row or _row(item.stem, str(item.path), "missing", "no run record (not run yet, or the "
                                                                           "job was stopped before it finished)"))
    return ordered + list(rows.values())


def _row(name: str, slide: str, status: str, error: str = "", **values) -> dict:
    row = dict.fromkeys(SUMMARY_COLUMNS)
    row.update(name=name, slide=slide, status=status, error=error, **values)
    return row


def _record_row(name: str, rec: dict) -> dict:
    slide = str(rec["slide"].get("path", ""))
    if rec["status"] == "failed":
        return _row(name, slide, "failed", rec.get("error", ""))
    meas = rec.get("measurements", {})
    wall = rec.get("timings_s", {}).get("total_s")
    mpx = rec.get("mpx_processed")
    per_class = {}
    classes = rec.get("classes")
    for cls, v in (classes.items() if isinstance(classes, dict) else ()):
        if isinstance(v, dict):
            per_class[f"n_{cls}"], per_class[f"{cls}_per_mm2"] = v.get("nuclei"), v.get("per_mm2")
    table = rec.get("output", {}).get("table")
    if table and Path(table).exists():  # --parquet: per-slide means of every measurement
        from pronet_wsi.table import table_means

        per_class.update({f"mean {k}": round(v, 6) for k, v in table_means(Path(table)).items()})
    return {**_row(name, slide, "done", "", nuclei=rec.get("counts", {}).get("nuclei"),
                   tissue_area_mm2=meas.get("tissue_area_mm2"), nuclei_per_mm2=meas.get("nuclei_per_mm2"),
                   mean_area_um2=meas.get("mean_area_um2"), wall_time_s=wall,
                   mpx_per_s=round(mpx / wall, 3) if wall and mpx is not None else None), **per_class}


def summary_totals(rows: list[dict]) -> dict:
    """Counts by status and totals over the ``done`` rows (nuclei, tissue area, density, mean area, wall, Mpx/s)."""
    done = [r for r in rows if r["status"] == "done"]
    by_status: dict[str, int] = {}
    for r in rows:
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
    nuclei = sum(r["nuclei"] or 0 for r in done)
    area = sum(r["tissue_area_mm2"] or 0.0 for r in done)
    wall = sum(r["wall_time_s"] or 0.0 for r in done)
    mpx = sum((r["mpx_per_s"] or 0.0) * (r["wall_time_s"] or 0.0) for r in done)
    with_area = [r for r in done if r["mean_area_um2"] is not None and r["nuclei"]]
    n_area = sum(r["nuclei"] for r in with_area)
    return {"slides": len(rows), **by_status, "nuclei": nuclei, "tissue_area_mm2": area,
            "nuclei_per_mm2": nuclei / area if area else None,
            "mean_area_um2": sum(r["mean_area_um2"] * r["nuclei"] for r in with_area) / n_area if n_area else None,
            "wall_time_s": wall, "mpx_per_s": mpx / wall if wall else None}


def format_totals(totals: dict) -> str:
    states = ", ".join(f"{totals[k]} {k}" for k in ("done", "failed", "missing", "unreadable") if totals.get(k))
    lines = [f"{totals['slides']} slides: {states or 'none'}"]
    dens = f" ({totals['nuclei_per_mm2']:,.0f} nuclei/mm^2)" if totals["nuclei_per_mm2"] is not None else ""
    mean = f"; mean nucleus area {totals['mean_area_um2']:.1f} um^2" if totals["mean_area_um2"] is not None else ""
    lines.append(f"{totals['nuclei']:,} nuclei in {totals['tissue_area_mm2']:.2f} mm^2 of tissue{dens}{mean}")
    rate = f" ({totals['mpx_per_s']:.2f} Mpx/s)" if totals["mpx_per_s"] is not None else ""
    lines.append(f"{totals['wall_time_s']:.1f} s of slide wall time summed{rate}")
    return "\n".join(lines)


def write_summary_csv(path: str | os.PathLike, rows: list[dict]) -> None:
    """Write the rows as CSV (columns :data:`SUMMARY_COLUMNS`, then ``n_<class>`` and ``<class>_per_mm2`` for
    every nucleus class of a typed model's slides; empty cells for unknown values), atomically."""
    check_report(Path(path), SUMMARY_COLUMNS)
    extra = list(dict.fromkeys(k for r in rows for k in r if k not in SUMMARY_COLUMNS))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[*SUMMARY_COLUMNS, *extra], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_bytes(Path(path), buf.getvalue().encode())  # recognised as ours by its header
