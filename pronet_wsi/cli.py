"""The `pronet-wsi` command line: the one Click module.

Commands call into the package. Bad input (:class:`~pronet_wsi.errors.InputError`) and OS errors become a
one-line message and exit code 1; any other exception is a bug: one line naming its type, "run with -v for the
traceback", exit code 1, and with ``-v`` the traceback.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import sys
import traceback
from pathlib import Path

import click

from pronet_wsi.errors import InputError, bug_message


def friendly_errors(func):
    """Turn bad-input and OS exceptions into one-line ClickExceptions (no traceback), and any other exception (a
    bug) into one line naming its type with the -v hint (``-v``: the traceback too); an output folder this command
    created and left empty is removed when it fails."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        outdir = kwargs.get("outdir")
        fresh = outdir is not None and not os.path.lexists(outdir)
        try:
            return func(*args, **kwargs)
        except BaseException:
            if fresh:
                _remove_if_empty(Path(outdir))
            raise

    @functools.wraps(func)
    def guarded(*args, **kwargs):
        try:
            return wrapper(*args, **kwargs)
        except OSError as exc:
            from pronet_wsi.files import describe_os_error

            raise click.ClickException(describe_os_error(exc)) from exc
        except InputError as exc:
            raise click.ClickException(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc
        except KeyboardInterrupt:
            click.echo(f"interrupted{INTERRUPTED.get(func.__name__, '')}", err=True)
            sys.exit(130)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except Exception as exc:  # not bad input: a bug, shown as one line unless -v asks for the traceback
            if _verbose():
                click.echo(traceback.format_exc().rstrip(), err=True)
            raise click.ClickException(bug_message(exc, hint=not _verbose())) from exc

    return guarded


INTERRUPTED = {  # what an interrupted command keeps, where it keeps anything
    "segment": ": finished tiles are kept; run the same command again to resume",
    "train": ": finished epochs are kept; run the same command with --resume to continue",
}


def _verbose() -> bool:
    """True when the command line asked for ``-v`` (debug logging and tracebacks)."""
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.find_root().params.get("verbose"))


def _remove_if_empty(folder: Path) -> None:
    """Remove ``folder`` when it holds nothing (or only our hidden bookkeeping of no outputs)."""
    import contextlib

    with contextlib.suppress(OSError):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


@click.group()
@click.version_option(package_name="pronet-wsi")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def main(verbose: bool) -> None:
    """PROnet nuclei instance segmentation from point annotations, for images and whole slides."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")


# --- commands are added below, one function each ---


@main.command()
@click.argument("pred_dir", type=click.Path(path_type=Path))
@click.argument("gt_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", "output_csv", type=click.Path(path_type=Path), default=None,
              help="Write the scores to this CSV (instance maps: image, object_dice, pixel_dice, aji, pq per image "
                   "and the mean; typed: one row per class, mean and detection).")
@click.option("--radius-um", type=float, default=3.0, show_default=True,
              help="Typed detection: a predicted nucleus matches a click within this distance (HoVer-Net: 12 px "
                   "at 0.25 um/px).")
@click.option("--mpp", type=float, default=0.25, show_default=True,
              help="Typed detection: pixel size of the images the points refer to, in um/px (0.5 for 20x).")
@friendly_errors
def evaluate(pred_dir: Path, gt_dir: Path, output_csv: Path | None, radius_um: float, mpp: float) -> None:
    """Score predictions in PRED_DIR against ground truth in GT_DIR (paired by file stem).

    Instance maps (<stem>.tif vs <stem>.png/.tif): prints object Dice, pixel Dice, AJI and PQ per image and their
    mean over images. Typed detection, when PRED_DIR holds <stem>_nuclei.csv (from `predict`) and GT_DIR holds
    class-labelled clicks <stem>.csv (x,y,class) or <stem>.geojson (QuPath points): matches nuclei to clicks
    within --radius-um and prints per-class precision, recall, F1 and HoVer-Net's F_c, and detection F_d, pooled
    over the images. Clicks without a class count for detection only.
    """
    from pronet_wsi.evaluation import (
        CSV_COLUMNS,
        TYPED_CSV_COLUMNS,
        evaluate_folder,
        evaluate_typed_folder,
        format_table,
        format_typed_table,
        has_nucleus_tables,
        has_point_files,
        write_scores_csv,
        write_typed_csv,
    )
    from pronet_wsi.files import check_report
    from pronet_wsi.wsi.pipeline import check_writable

    typed_mode = has_nucleus_tables(pred_dir) and has_point_files(gt_dir)
    if output_csv is not None:  # before the work: a report never replaces a file it did not write
        check_report(output_csv, TYPED_CSV_COLUMNS if typed_mode else CSV_COLUMNS)
        check_writable(output_csv.parent)

    if typed_mode:
        if not (0 < mpp <= 20) or not 0 < radius_um <= 100:
            raise InputError(f"--mpp {mpp:g} um/px, --radius-um {radius_um:g}: need 0 < mpp <= 20 (0.25 at 40x, 0.5 "
                             "at 20x) and 0 < radius <= 100 um")
        typed = evaluate_typed_folder(pred_dir, gt_dir, radius_um / mpp)
        click.echo(format_typed_table(typed))
        if typed.unknown_pred_classes:
            click.echo(f"predicted classes never clicked (scored as a wrong class): "
                       f"{', '.join(typed.unknown_pred_classes)}")
        click.echo(f"scored {len(typed.rows)} image(s), matching within {radius_um:g} um = {radius_um / mpp:g} px; "
                   "ground truth without a prediction is not scored")
        if output_csv is not None:
            write_typed_csv(output_csv, typed)
            click.echo(f"wrote {output_csv}")
        return
    rows, mean = evaluate_folder(pred_dir, gt_dir)
    click.echo(format_table(rows, mean))
    click.echo(f"scored {len(rows)} prediction(s); ground truth without a prediction is not scored")
    if output_csv is not None:
        write_scores_csv(output_csv, rows, mean)
        click.echo(f"wrote {output_csv}")


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("-o", "--outdir", required=True, type=click.Path(file_okay=False, path_type=str),
              help="Folder for <stem>.tif (uint32 instance map), <stem>_overlay.png and <stem>_nuclei.csv.")
@click.option("-m", "--model", "model_dir", default=None, type=click.Path(path_type=str),
              help="Model folder (default: the shipped model).")
@click.option("--mpp", type=float, default=None,
              help="Images' resolution in um/px (default: the model's); resampled to the model's.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--window-px", default=1024, show_default=True,
              help="Largest model input; larger images run in the tiles segment --tile-px cuts.")
@click.option("--tta", is_flag=True,
              help="Test-time augmentation: average the 8 flips/rotations (8x the model time; see RESULTS.md).")
@click.option("--beyond-edge", type=click.Choice(["mirror", "white"]), default="mirror", show_default=True,
              help="What the network sees beyond an image's edge: its mirror (an image is a crop of tissue) or "
                   "white (glass, as segment beyond a slide: the nuclei then equal segment's of the same pixels).")
@click.option("--overwrite", is_flag=True,
              help="Replace existing <stem>.tif / <stem>_overlay.png that pronet-wsi did not write (never inputs).")
@click.option("--cells", "cells_um", type=float, default=0.0, show_default=True, metavar="UM",
              help="Also write <stem>_cells.tif: each nucleus grown by up to UM micrometres into a cell (QuPath's "
                   "cell expansion; label i = nucleus i), and a cell_area_um2 column.")
@friendly_errors
def predict(inputs: tuple[str, ...], outdir: str, model_dir: str | None, mpp: float | None, device: str,
            window_px: int, tta: bool, beyond_edge: str, overwrite: bool, cells_um: float) -> None:
    """Segment nuclei in PNG/TIFF/JPEG images; write instance maps, overlays and a table of nuclei.

    <stem>_nuclei.csv has one row per nucleus: id (its label in <stem>.tif), x, y (its centre in the image's
    continuous pixel frame, as QuPath's), class and class_probability (a typed model's; "Nucleus" otherwise) and
    area_um2.
    """
    from pathlib import Path

    from pronet_wsi.export import write_nuclei_csv
    from pronet_wsi.files import check_outputs
    from pronet_wsi.images import list_images, read_image, write_labels, write_png
    from pronet_wsi.inference import InferenceConfig, Predictor, segment_image
    from pronet_wsi.overlay import draw_contours
    from pronet_wsi.wsi.pipeline import check_writable

    check_mpp_option(mpp)
    if not 0 <= cells_um <= 50:
        raise InputError(f"--cells {cells_um}: give a distance between 0 (no cells) and 50 um (QuPath's default is 5)")
    paths = list_images(list(inputs))
    out = Path(outdir)
    targets = prediction_outputs(paths, out)
    cell_maps = [t[0].with_name(f"{p.stem}_cells.tif") for p, t in targets.items()] if cells_um > 0 else []
    check_outputs([t for pair in targets.values() for t in pair] + cell_maps, paths, overwrite)
    notes: list[str] = []
    images = [(p, read_image(p, notes)) for p in paths[:1]]  # fail fast on the first file before loading the model
    predictor = Predictor(model_dir, InferenceConfig(device=device, window_px=window_px, tta=tta,
                                                     beyond_edge=beyond_edge))
    if mpp is not None:
        from pronet_wsi.geometry import check_scale

        check_scale(mpp, predictor.mpp, "--mpp")
    check_writable(out)
    for i, path in enumerate(paths):
        image = images[0][1] if i == 0 else read_image(path, notes)
        for note in notes:
            click.echo(f"NOTE {note}", err=True)
        notes.clear()
        seg = segment_image(image, predictor, mpp=mpp)
        labels_path, overlay_path, table_path = targets[path]
        write_labels(labels_path, seg.labels)
        write_png(overlay_path, draw_contours(image, seg.labels))
        image_mpp = mpp if mpp is not None else predictor.mpp
        cells = None
        if cells_um > 0:
            from pronet_wsi.cells import expand_labels

            cells = expand_labels(seg.labels, cells_um / image_mpp)
            write_labels(labels_path.with_name(f"{path.stem}_cells.tif"), cells)
        write_nuclei_csv(table_path, seg, predictor.classes, image_mpp, cells)
        click.echo(f"{path.name}: {seg.n} nuclei -> {labels_path}")


def prediction_outputs(paths: list[Path], out: Path) -> dict[Path, tuple[Path, Path, Path]]:
    """``<stem>.tif``, ``<stem>_overlay.png`` and ``<stem>_nuclei.csv`` in ``out`` for each input; an error if two
    inputs share a stem or an output would overwrite an input (inputs are never overwritten)."""
    targets: dict[Path, tuple[Path, Path, Path]] = {}
    by_stem: dict[str, Path] = {}
    inputs = {p.resolve() for p in paths}
    for p in paths:
        if p.stem in by_stem:
            raise InputError(f"{p} and {by_stem[p.stem]} would both write {out / (p.stem + '.tif')}; rename one "
                             "or predict them into different -o folders")
        by_stem[p.stem] = p
        pair = (out / f"{p.stem}.tif", out / f"{p.stem}_overlay.png", out / f"{p.stem}_nuclei.csv")
        for t in pair:
            if t.resolve() in inputs:
                raise InputError(f"-o {out}: the output {t} would overwrite the input image {t}; choose another -o")
        targets[p] = pair
    return targets


@main.command()
@friendly_errors
def info() -> None:
    """Print versions, the compute device and the default model."""
    import platform

    import numpy as np
    import torch

    from pronet_wsi import __version__
    from pronet_wsi.model import default_model_dir, load_model

    click.echo(f"pronet-wsi {__version__}  python {platform.python_version()}  numpy {np.__version__}  "
               f"torch {torch.__version__}")
    if torch.cuda.is_available():
        click.echo(f"device: cuda ({torch.cuda.get_device_name(0)})")
    else:
        click.echo(f"device: cpu ({torch.get_num_threads()} threads)")
    click.echo(runtime_line())
    found = default_model_dir()
    if found is None:
        click.echo("default model: none installed (pass -m MODEL_DIR)")
    else:
        b = load_model(found)
        click.echo(f"default model: {found} (width {b.config.width}, mpp {b.config.mpp})")


def recipe_default(key: str) -> str:
    """``(default: the recipe's: cpu X, paper Y; with --init Z)`` for a TrainConfig field, from the recipes
    themselves (one owner of each value)."""
    from pronet_wsi.training.loop import FINE_TUNE, RECIPES, TrainConfig

    base = {f: getattr(TrainConfig, f) for f in ("width", "epochs", "batch_size", "lr", "weight_decay", "schedule",
                                                  "patch_px", "patches_per_image")}
    parts = [f"{name} {RECIPES[name].get(key, base[key]):g}" if not isinstance(base[key], str)
             else f"{name} {RECIPES[name].get(key, base[key])}" for name in RECIPES]
    text = "(default: the --recipe's: " + ", ".join(parts)
    if key in FINE_TUNE:
        text += f"; with --init {FINE_TUNE[key]:g}"
    elif key == "width":
        text += "; with --init the start model's"
    return text + ")."


# train options a --resume run takes from its saved settings: option -> (TrainConfig field, value it sets)
RESUME_FIXED = {"width": "width", "batch_size": "batch_size", "lr": "lr", "weight_decay": "weight_decay",
                "schedule": "schedule", "patch_px": "patch_px", "patches_per_image": "patches_per_image",
                "model_mpp": "mpp", "holdout": "holdout", "type_lr_factor": "type_lr_factor", "seed": "seed",
                "device": "device", "init": "init"}


def check_resume_options(ctx: click.Context, saved) -> None:
    """A UsageError naming the options a ``--resume`` run would ignore: those given with a value other than the
    saved run's (``saved``, its TrainConfig). The same command line again (the same values) is accepted."""
    from click.core import ParameterSource

    from pronet_wsi.training.loop import RECIPES

    def given(name: str) -> bool:
        return ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)

    p = ctx.params
    differs = [n for n, field in RESUME_FIXED.items() if given(n) and p[n] != getattr(saved, field)]
    differs += [n for n, on in (("freeze_trunk", saved.freeze_trunk), ("euclidean", not saved.pseudo.geodesic),
                                ("no_offsets", not saved.use_offsets), ("no_refine", not saved.use_refinement))
                if given(n) and p[n] and not on]
    if given("keep_start") and p["keep_start"] != saved.loss.lambda_keep:
        differs.append("keep_start")
    if given("recipe") and any(getattr(saved, k) != v for k, v in RECIPES[p["recipe"]].items()
                               if k not in RESUME_FIXED.values() and not saved.init):
        differs.append("recipe")
    if differs:
        names = ", ".join("--" + n.replace("_", "-") for n in differs)
        raise click.UsageError(f"--resume continues with the run's saved settings and would ignore {names}; drop "
                               "them (only --epochs and --max-minutes may change) or train into a new -o")


def runtime_line() -> str:
    """Which engine runs the forward by default here, and at what precision (what ``segment`` will use)."""
    from pronet_wsi.inference import _cpu_has_bf16, resolve_device
    from pronet_wsi.runtime import CACHE_ENV_VAR, ENV_VAR, auto_streams, available_cpus, cache_dir, choose_runtime

    device = resolve_device("auto")
    runtime = choose_runtime("auto", device)
    if runtime == "openvino":
        import openvino

        name = f"openvino {openvino.__version__.split('-')[0]}"
    else:
        import torch

        name = f"torch {torch.__version__}"
    precision = "fp16" if device.type == "cuda" else "bf16" if _cpu_has_bf16() else "fp32"
    int8 = int8_line() if runtime == "openvino" else ""
    if int8.startswith("the shipped model's INT8 graph runs"):
        precision = "int8 (the rest fp32)"
    hint = "" if runtime == "openvino" or device.type == "cuda" else \
        ' (pip install "pronet-wsi[fast]" for the OpenVINO forward)'
    line = f"runtime: {name}, {precision} (env {ENV_VAR}=torch|openvino forces one){hint}"
    if runtime == "openvino":
        streams = auto_streams()
        line += (f"\nsegment: {streams} forwards at once on {available_cpus()} CPUs"
                 if streams > 1 else "\nsegment: one forward at a time")
        folder = cache_dir()
        line += f"\ngraph cache: {folder / 'openvino' if folder is not None else 'off'} (env {CACHE_ENV_VAR}=DIR|off)"
        line += f"\nint8: {int8}"
    return line


def int8_line() -> str:
    """Whether the shipped model's INT8 graph runs here (the OpenVINO forward only)."""
    from pronet_wsi.model import default_model_dir
    from pronet_wsi.runtime import INT8_ENV_VAR, int8_wanted, read_int8_graph

    model = default_model_dir()
    if model is None or read_int8_graph(model)[0] is None:
        return "the shipped model has no INT8 graph; the float graph runs"
    if not int8_wanted("auto"):
        return f"off ({INT8_ENV_VAR}=off): the float graph runs"
    return f"the shipped model's INT8 graph runs (env {INT8_ENV_VAR}=off runs the float one)"


def _names(value: str | None) -> list[str] | None:
    return [n.strip() for n in value.split(",") if n.strip()] if value else None


@main.command()
@click.option("--images", type=click.Path(path_type=str), help="Folder of training images.")
@click.option("--points", type=click.Path(path_type=str), multiple=True,
              help="Folder of <stem>.csv / <stem>.geojson point files (with --images), or the QuPath points of "
                   "each --slide (repeat in the same order).")
@click.option("--labels", type=click.Path(path_type=str),
              help="Folder of instance maps; points = their centroids (for experiments).")
@click.option("--names", help="Comma-separated image stems to use (default: all).")
@click.option("--shift", nargs=2, type=float, default=None, help="Shift label-derived points by MIN MAX px.")
@click.option("--slide", type=click.Path(path_type=str), multiple=True,
              help="Train from whole-slide images (repeatable, one --points each; --mpp gives their pixel size "
                   "when the file has none).")
@click.option("--slide-mpp", type=float, default=None, hidden=True, expose_value=True)
@click.option("--regions", type=click.Path(path_type=str), multiple=True,
              help="GeoJSON of the areas whose nuclei are all clicked, one per --slide (default: the rectangle / "
                   "polygon annotations exported with the points).")
@click.option("--slide-list", type=click.Path(path_type=str),
              help="CSV with columns slide,points[,mpp][,regions], one row per slide (instead of --slide).")
@click.option("--val-images", type=click.Path(path_type=str), help="Validation images folder.")
@click.option("--val-labels", type=click.Path(path_type=str), help="Validation instance maps (for scores/tuning).")
@click.option("--val-names", help="Comma-separated validation stems.")
@click.option("--recipe", type=click.Choice(["cpu", "paper"]), default="cpu", show_default=True,
              help="cpu: what made the shipped model (width 0.25, Adam 1e-3 cosine, 120 epochs); paper: PROnet's "
                   "GPU recipe (full-width VGG16, Adam 1e-4, 150 epochs). Options below override it.")
@click.option("--init", default=None, metavar="default|MODEL_DIR",
              help="Start from a model folder's weights, width, mpp and normalisation (default = the shipped "
                   "model) with the fine-tune settings (lr 5e-4, offsets and refinement from the start).")
@click.option("--width", type=float, default=None,
              help="Channel multiplier of the VGG16 encoder (1.0 = the paper's) " + recipe_default("width"))
@click.option("--epochs", type=int, default=None,
              help="Passes over the training patches " + recipe_default("epochs") + "; with --resume: train on to "
                   "this many (the schedule stretches).")
@click.option("--batch-size", type=int, default=None, help="Patches per optimiser step " + recipe_default("batch_size"))
@click.option("--lr", type=float, default=None, help="Adam learning rate " + recipe_default("lr"))
@click.option("--weight-decay", type=float, default=None, help="Adam weight decay " + recipe_default("weight_decay"))
@click.option("--schedule", type=click.Choice(["constant", "cosine"]), default=None,
              help="Learning rate after the warm-up: constant or a cosine down to 2% " + recipe_default("schedule"))
@click.option("--patch-px", type=int, default=None,
              help="Side of the square training patches, px at the model's mpp, a multiple of 16 "
                   + recipe_default("patch_px"))
@click.option("--patches-per-image", type=int, default=None,
              help="Patches per epoch per megapixel of image " + recipe_default("patches_per_image"))
@click.option("--mpp", type=float, default=None,
              help="Pixel size of the inputs in um/px (e.g. 0.5 for 20x): of the --images and --val-images (they are "
                   "resampled to the model's; default: already at the model's), or of each --slide whose file has "
                   "none.")
@click.option("--model-mpp", type=float, default=None,
              help="Working resolution (um/px) of the model (default: --mpp, else 0.25; with --init the start "
                   "model's; another value rescales the start model, which the run then fine-tunes).")
@click.option("--holdout", type=float, default=None,
              help="Without --val-images: hold back this share of the training images; their clicks score each "
                   "validated epoch, the best epoch is kept and the detection thresholds are tuned on them; with "
                   "fewer than 100 held-back clicks every image trains instead (default: 0; with --init 0.1).")
@click.option("--type-lr-factor", type=float, default=None,
              help="The type head's learning rate is --lr times this (default: the recipe's; with --init 5 from "
                   "5,000 classed clicks on, else 1).")
@click.option("--freeze-trunk", is_flag=True,
              help="With classed points and --init: train only the type head (the start model's nuclei unchanged).")
@click.option("--keep-start", type=float, default=None,
              help="With --init: weight of a term that keeps the nuclei maps near the start model's while the "
                   "clicks teach (0 = off; default: 1 from fewer than 5,000 clicks, classed clicks for classed "
                   "points, else 0).")
@click.option("--euclidean", is_flag=True, help="Euclidean instead of geodesic pseudo labels (ablation).")
@click.option("--no-offsets", is_flag=True, help="No offset module: centre map + binary only (ablation).")
@click.option("--no-refine", is_flag=True, help="No EM point refinement (ablation).")
@click.option("--max-minutes", type=float, default=None, help="Stop after this wall time (model still written).")
@click.option("--seed", type=int, default=None,
              help="Seed of the patch sampling, augmentation, shifts and weights (default: 0); a run is "
                   "reproducible on one machine.")
@click.option("--device", default=None, help="auto, cpu or cuda[:N] (default: auto, a GPU when there is one).")
@click.option("--resume", is_flag=True,
              help="Continue the run in -o from its last checkpoint with its saved settings: give the same inputs; "
                   "only --epochs and --max-minutes may change.")
@click.option("--drop-outside", is_flag=True, help="Drop points outside their image instead of failing.")
@click.option("--drop-unmatched", is_flag=True,
              help="Train on the images that have a points file, with a warning listing images without points and "
                   "points files without an image (default: that is an error).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("-o", "--outdir", required=True, type=click.Path(file_okay=False, path_type=str),
              help="Model folder to write.")
@friendly_errors
def train(images, points, labels, names, shift, slide, slide_mpp, regions, slide_list, val_images, val_labels,
          val_names, recipe, init,
          width, epochs, batch_size, lr, weight_decay, schedule, patch_px, patches_per_image, mpp, model_mpp,
          holdout, type_lr_factor, freeze_trunk, keep_start, euclidean, no_offsets, no_refine, max_minutes, seed,
          device, resume, drop_outside, drop_unmatched, quiet, outdir) -> None:
    """Train PROnet from point annotations (image folders + points, or QuPath points on a slide)."""
    from pathlib import Path

    from pronet_wsi.training.inputs import load_items, load_slide_items, read_slide_list, resample_items
    from pronet_wsi.training.loop import CHECKPOINT, TrainConfig
    from pronet_wsi.training.loop import train as run_training
    from pronet_wsi.training.losses import LossConfig
    from pronet_wsi.training.pseudolabels import PseudoLabelConfig
    from pronet_wsi.wsi.pipeline import check_writable

    if slide_mpp is not None:
        raise click.UsageError("--slide-mpp is now --mpp (the inputs' pixel size, slides included); the model's "
                               "working resolution is --model-mpp")
    if max_minutes is not None and not 0 < max_minutes < float("inf"):
        raise InputError(f"--max-minutes {max_minutes}: give a number of minutes > 0")
    check_mpp_option(mpp)
    model_files = [n for n in ("config.json", "weights.pt", "thresholds.json") if (Path(outdir) / n).exists()]
    if not resume and model_files and not (Path(outdir) / "train" / CHECKPOINT).exists():
        raise InputError(f"-o {outdir}: holds {model_files[0]} of a model this run did not train; choose a new -o "
                         "(a model folder is never overwritten)")
    if resume and (Path(outdir) / "train" / "train_config.json").exists():
        import dataclasses
        import json

        config = TrainConfig.from_json(json.loads((Path(outdir) / "train" / "train_config.json").read_text()))
        check_resume_options(click.get_current_context(), config)
        if max_minutes is not None:
            config = dataclasses.replace(config, max_minutes=max_minutes)
        if epochs is not None:  # continue to more epochs (the schedule stretches to the new length)
            config = dataclasses.replace(config, epochs=epochs)
    else:
        if init is None and model_mpp is None and not (slide or slide_list):  # images at --mpp: the model too
            model_mpp = mpp  # (with --init the recipe takes the start model's, or --model-mpp)
        config = TrainConfig.recipe(
            recipe, init=init, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
            schedule=schedule, patch_px=patch_px, patches_per_image=patches_per_image, width=width, mpp=model_mpp,
            freeze_trunk=True if freeze_trunk else None, holdout=holdout, type_lr_factor=type_lr_factor,
            seed=seed, device=device, max_minutes=max_minutes, use_offsets=False if no_offsets else None,
            use_refinement=False if no_refine else None,
            pseudo=PseudoLabelConfig(geodesic=False) if euclidean else None,
            loss=LossConfig(lambda_keep=keep_start) if keep_start is not None else None)
    if slide or slide_list:
        if images or labels or (slide and slide_list) or (slide_list and (points or regions)):
            raise click.UsageError("give --slide with --points, or --slide-list, and no --images/--labels")
        if slide and (len(points) != len(slide) or (regions and len(regions) != len(slide))):
            raise click.UsageError("give one --points POINTS.geojson (and one --regions, if any) per --slide")
        rows = [(sl, pts, mpp if sl_mpp is None else sl_mpp, reg)  # a row's own mpp wins
                for sl, pts, sl_mpp, reg in read_slide_list(slide_list)] if slide_list else [
            (sl, pts, mpp, regions[i] if regions else None)
            for i, (sl, pts) in enumerate(zip(slide, points, strict=True))]
        items = [it for sl, pts, sl_mpp, reg in rows
                 for it in load_slide_items(sl, pts, config.mpp, slide_mpp=sl_mpp, region_px=4 * config.patch_px,
                                            drop_outside=drop_outside, regions_path=reg)]
    else:
        if not images:
            raise click.UsageError("give --images (with --points or --labels), --slide with --points, or --slide-list")
        if len(points) > 1:
            raise click.UsageError("--images takes one --points folder")
        items = load_items(images, points[0] if points else None, labels, names=_names(names),
                           shift=tuple(shift) if shift else None, seed=config.seed, drop_outside=drop_outside,
                           drop_unmatched=drop_unmatched)
        if mpp is not None:
            items = resample_items(items, mpp / config.mpp)
    val = None
    if val_images:
        if not val_labels:
            raise click.UsageError("--val-images needs --val-labels (instance maps to score against)")
        from pronet_wsi.inference import resample_image, resample_labels
        from pronet_wsi.training.inputs import load_val_items

        val = load_val_items(val_images, val_labels, _names(val_names))
        if mpp is not None and abs(mpp / config.mpp - 1) > 1e-3:
            val = [(n, w := resample_image(im, mpp / config.mpp), resample_labels(gt, w.shape[:2]))
                   for n, im, gt in val]
    check_writable(Path(outdir))
    out = run_training(config, items, outdir, val_items=val, resume=resume, progress=not quiet)
    click.echo(f"model written to {out}")


@main.command("pseudo-labels")
@click.argument("image", type=click.Path(path_type=Path))
@click.argument("points", type=click.Path(path_type=Path))
@click.option("-o", "--outdir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for <stem>_voronoi.png, <stem>_cluster.png, <stem>_pseudolabels.png (+ .json).")
@click.option("--lam", type=float, default=None, help="Geodesic weight in [0, 1] (default: PseudoLabelConfig's).")
@click.option("--euclidean", is_flag=True, help="Euclidean instead of geodesic distance (the paper's ablation).")
@click.option("--d-star", type=float, default=None, help="Distance truncation for k-means (paper: 70 MoNuSeg).")
@click.option("--drop-outside", is_flag=True, help="Drop points outside the image instead of failing.")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs that pronet-wsi did not write.")
@friendly_errors
def pseudo_labels(image: Path, points: Path, outdir: Path, lam: float | None, euclidean: bool,
                  d_star: float | None, drop_outside: bool, overwrite: bool) -> None:
    """Voronoi label V and cluster label K (paper 2.1) of IMAGE from the POINTS file (.csv x,y or .geojson).

    The label PNGs are uint8: 0 background, 1 foreground, 2 ignore.
    """
    import dataclasses
    import json

    import numpy as np
    from PIL import Image

    from pronet_wsi.files import atomic_write, check_outputs, mark_owned
    from pronet_wsi.geometry import xy_to_index
    from pronet_wsi.images import read_image
    from pronet_wsi.training.points import clip_points, read_points
    from pronet_wsi.training.pseudolabels import PseudoLabelConfig, figure_pseudo_labels
    from pronet_wsi.training.pseudolabels import pseudo_labels as make_pseudo_labels

    config = PseudoLabelConfig(geodesic=not euclidean)
    if lam is not None or d_star is not None:
        config = dataclasses.replace(config, lam=config.lam if lam is None else lam,
                                     d_star=config.d_star if d_star is None else d_star)
    names = [outdir / f"{image.stem}_{n}" for n in ("voronoi.png", "cluster.png", "pseudolabels.png",
                                                       "pseudolabels.json")]
    check_outputs(names, [image, points], overwrite)
    rgb = read_image(image)
    pts, n_dropped = clip_points(read_points(points), rgb.shape[:2], drop_outside=drop_outside, source=str(points))
    pts = xy_to_index(pts)  # file frame -> the array frame of the pseudo labels
    if len(pts) == 0:
        raise InputError(f"{points}: no points inside the image; pseudo labels need at least one point")
    voronoi, cluster = make_pseudo_labels(rgb, pts, config)
    stem = image.stem
    for name, lab in (("voronoi", voronoi), ("cluster", cluster)):
        def save_png(tmp: Path, lab: np.ndarray = lab) -> None:
            Image.fromarray(lab).save(tmp, format="PNG")

        atomic_write(outdir / f"{stem}_{name}.png", save_png)
        mark_owned(outdir / f"{stem}_{name}.png")
    fig = figure_pseudo_labels(rgb, voronoi, cluster, pts, title=f"{stem}: {len(pts)} points, "
                               + ("Euclidean" if euclidean else f"geodesic lam={config.lam:g}"))
    atomic_write(outdir / f"{stem}_pseudolabels.png", lambda tmp: fig.savefig(tmp, format="png"))
    mark_owned(outdir / f"{stem}_pseudolabels.png")
    record = {"image": str(image), "points": str(points), "n_points": len(pts), "n_dropped": n_dropped,
              "config": dataclasses.asdict(config),
              "pixel_counts_bg_fg_ignore": {name: np.bincount(lab.ravel(), minlength=3).tolist()
                            for name, lab in (("voronoi", voronoi), ("cluster", cluster))}}
    atomic_write(outdir / f"{stem}_pseudolabels.json",
                 lambda tmp: tmp.write_text(json.dumps(record, indent=2), encoding="utf-8"))
    mark_owned(outdir / f"{stem}_pseudolabels.json")
    dropped = f" ({n_dropped} outside the image dropped)" if n_dropped else ""
    click.echo(f"{image.name}: {len(pts)} points{dropped} -> {outdir / (stem + '_voronoi.png')}, "
               f"{stem}_cluster.png, {stem}_pseudolabels.png")


@main.command()
@click.argument("slides", nargs=-1, type=click.Path(path_type=str))
@click.option("-o", "--outdir", required=True, type=click.Path(path_type=Path),
              help="Output folder: <stem>.geojson, <stem>_overlay.png, <stem>_tissue.png, <stem>.json.")
@click.option("--manifest", type=click.Path(path_type=Path), default=None,
              help="CSV of slides instead of SLIDES: columns path, optional mpp and output (header optional); "
                   "relative paths are relative to the CSV.")
@click.option("--shard", default=None, metavar="I/N",
              help="Only every N-th slide from the I-th (0-based), e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT.")
@click.option("-m", "--model", "model_dir", default=None, type=click.Path(path_type=str),
              help="Model folder (default: the shipped model).")
@click.option("--mpp", type=float, default=None,
              help="Slide pixel size in um (needed when the file has none; a manifest's mpp column wins).")
@click.option("--backend", type=click.Choice(["auto", "openslide", "tiffslide"]), default="auto", show_default=True,
              help="Slide reader. auto: tiffslide for Aperio SVS and generic TIFFs (the same pixels, less CPU), "
                   "OpenSlide first for every other format.")
@click.option("--tile-px", type=int, default=1792, show_default=True,  # TilingConfig's (a test checks)
              help="Largest model input tile side (px at model mpp); the grid splits the slide evenly.")
@click.option("--halo-px", type=int, default=None,
              help="Context on each side of a tile core (default: the model's context_px, 160 px for the shipped "
                   "model: its maps do not change beyond it).")
@click.option("--batch-size", type=int, default=1, show_default=True, help="Tiles per model call.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--workers", type=int, default=0, show_default=True,
              help="Parallel tile tasks (0 = CPUs + 1, at most 9).")
@click.option("--scheduler", default=None,
              help="Dask cluster: local:N (N worker processes on this machine) or a running scheduler's address "
                   "tcp://HOST:PORT (default: threads in this process).")
@click.option("--connect-timeout", type=float, default=30.0, show_default=True,
              help="Seconds to wait for the --scheduler address to answer as a Dask scheduler.")
@click.option("--gzip", "gzip_output", is_flag=True, help="Write <stem>.geojson.gz.")
@click.option("--labels-zarr", is_flag=True, help="Also write the instance label image as <stem>_labels.zarr.")
@click.option("--no-tissue-mask", is_flag=True, help="Process the whole slide, glass included.")
@click.option("--tissue-annotation", is_flag=True,
              help="Also write <stem>_tissue.geojson: the tissue region as a QuPath annotation (import it with the "
                   "nuclei; Resolve hierarchy then puts them under it).")
@click.option("--overwrite", is_flag=True,
              help="Redo slides whose output already exists, and replace files in the way that pronet-wsi did not "
                   "write (never an input).")
@click.option("--tta", is_flag=True,
              help="Test-time augmentation: average the 8 flips/rotations (8x the model time; see RESULTS.md).")
@click.option("--cells", "cells_um", type=float, default=0.0, show_default=True, metavar="UM",
              help="Also grow each nucleus by up to UM micrometres into a cell (QuPath's cell expansion; 0 = none): "
                   "QuPath cells with the nucleus inside.")
@click.option("--measurements", "measure_level", type=click.Choice(["none", "basic", "all"]), default="all",
              show_default=True, help="QuPath measurements: none, basic (shape) or all (shape and H&E stain).")
@click.option("--parquet", is_flag=True, help="Also write <stem>_nuclei.parquet, one row per nucleus.")
@click.option("--max-features-per-file", type=int, default=0, show_default=True, metavar="N",
              help="Split the GeoJSON into <stem>.geojson, <stem>.part2.geojson, ... of N features (0 = one file).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@friendly_errors
def segment(slides, outdir, manifest, shard, model_dir, mpp, backend, tile_px, halo_px, batch_size, device, workers,
            scheduler, connect_timeout, gzip_output, labels_zarr, no_tissue_mask, tissue_annotation, overwrite, tta,
            cells_um, measure_level, parquet, max_features_per_file, quiet) -> None:
    """Segment nuclei in whole slides: one QuPath GeoJSON of detections per slide.

    SLIDES are files or quoted glob patterns ("slides/*.svs"), or give --manifest. Tiles are read at the
    model's resolution where there is tissue, run through the model while other tiles are read and
    post-processed, stitched so each nucleus appears once, and streamed to OUTDIR. A killed run resumes from
    its finished tiles; a finished slide is skipped unless --overwrite. A slide that fails gets a run record
    with its error (see `pronet-wsi summary`) and the others go on; the exit code is then 1.
    """
    import contextlib

    from pronet_wsi.inference import InferenceConfig, Predictor
    from pronet_wsi.measurements import MeasureConfig
    from pronet_wsi.model import resolve_model_dir
    from pronet_wsi.tiling import TilingConfig
    from pronet_wsi.wsi.cohort import duplicates, expand_inputs, parse_shard, read_manifest, segment_batch, select_shard
    from pronet_wsi.wsi.pipeline import check_slide, check_writable
    from pronet_wsi.wsi.plan import SegmentConfig
    from pronet_wsi.wsi.tile_task import TileModel

    if manifest is not None and slides:
        raise click.UsageError("give SLIDES or --manifest, not both")
    if manifest is None and not slides:
        raise click.UsageError("give one or more SLIDES (files or quoted glob patterns) or --manifest CSV")
    shard_ix = parse_shard(shard) if shard else None
    local_cluster = False
    if scheduler:
        import distributed  # noqa: F401  (its import sets its loggers to INFO; quiet them unless -v)

        from pronet_wsi.wsi.cluster import parse_scheduler

        local_cluster = parse_scheduler(scheduler)[0] == "local"
        if logging.getLogger().level > logging.INFO:
            logging.getLogger("distributed").setLevel(logging.WARNING)
    check_mpp_option(mpp)
    if not (connect_timeout > 0 and connect_timeout < float("inf")):
        raise InputError(f"--connect-timeout {connect_timeout}: give a number of seconds > 0")
    check_tile_memory(tile_px, batch_size)
    if not 0 <= cells_um <= 50:
        raise InputError(f"--cells {cells_um}: give a distance between 0 (no cells) and 50 um (QuPath's default is 5)")
    if max_features_per_file < 0:
        raise InputError(f"--max-features-per-file {max_features_per_file}: give 0 (one file) or a positive count")
    if halo_px is not None:
        TilingConfig(tile_px, halo_px)  # a bad pair fails before the model loads
    settings = dict(use_tissue_mask=not no_tissue_mask, batch_size=batch_size, workers=workers, gzip=gzip_output,
                    tissue_geojson=tissue_annotation, labels_zarr=labels_zarr, overwrite=overwrite,
                    measure=MeasureConfig(measure_level, cells_um), parquet=parquet,
                    max_features_per_file=max_features_per_file)
    planned = SegmentConfig(tiling=TilingConfig(tile_px, halo_px if halo_px is not None else TilingConfig().halo_px),
                            **settings)  # option errors before anything is written
    items = read_manifest(manifest) if manifest is not None else expand_inputs(slides)
    dups = duplicates(items)
    indices = list(range(len(items)))
    if shard_ix is not None:
        indices = select_shard(indices, *shard_ix)
        click.echo(f"shard {shard_ix[0]}/{shard_ix[1]}: {len(indices)} of {len(items)} slides", err=True)
    check_writable(outdir)
    failed = 0
    for i in [i for i in indices if i in dups]:
        click.echo(f"ERROR {items[i].path}: same output name as {dups[i].path}; segment it into another -o", err=True)
        failed += 1
    todo, seen = [], set()
    for i in indices:  # the same slide under the same name twice runs once
        key = (str(Path(items[i].path).resolve()), items[i].stem)
        if i not in dups and key not in seen:
            seen.add(key)
            todo.append(items[i])
    inputs = [Path(it.path) for it in items] + ([Path(manifest)] if manifest is not None else [])
    for item in todo:  # outputs in the way (inputs, files pronet-wsi did not write): one line, nothing written
        check_slide(item.path, outdir, planned, item.stem, inputs)
    # tiles per call: SegmentConfig.batch_size; streams=0: several OpenVINO forwards at once (tile threads)
    inference = InferenceConfig(device=device, tta=tta, streams=0)
    with contextlib.ExitStack() as stack:
        client = None
        predictor: TileModel | None = None
        if scheduler and todo:
            from pronet_wsi.wsi.cluster import ModelSpec, open_client

            predictor = ModelSpec.load(model_dir, inference, pin_gpus=local_cluster)
            client = stack.enter_context(open_client(scheduler, timeout_s=connect_timeout))
        elif todo:
            predictor = Predictor(resolve_model_dir(model_dir), inference)
        # what exists now (modules, the model) lives as long as the process: keep the collector's full passes, which
        # tiles' short-lived objects set off, from scanning it again and again (~1 s of an 18 s slide; RESULTS.md)
        gc.freeze()
        halo = halo_px if halo_px is not None else predictor.context_px if predictor is not None else \
            TilingConfig().halo_px
        config = SegmentConfig(tiling=TilingConfig(tile_px, halo), **settings)
        for outcome in segment_batch(todo, outdir, predictor, config, client=client,
                                     backend=backend, default_mpp=mpp, pin_gpus=local_cluster, progress=not quiet):
            path, msg = outcome.item.path, outcome.error
            if msg is not None:
                click.echo(f"ERROR: {msg}" if str(path) in msg else f"ERROR {path}: {msg}", err=True)
                failed += 1
                continue
            result = outcome.result
            assert result is not None  # an outcome without an error has a result
            for warning in result.warnings:
                click.echo(f"WARNING {path.name}: {warning}", err=True)
            click.echo(result.summary())
    if failed:
        if len(indices) > 1:  # one slide: its ERROR line says it all
            click.echo(f"{failed} of {len(indices)} slides failed", err=True)
        sys.exit(1)


def check_mpp_option(mpp: float | None, option: str = "--mpp") -> None:
    from pronet_wsi.slide import MPP_RANGE, plausible_mpp

    if mpp is not None and not plausible_mpp(mpp):
        raise InputError(f"{option} {mpp:g}: not a microscope pixel size (between {MPP_RANGE[0]} and {MPP_RANGE[1]} "
                         "um/px; 40x is ~0.25, 20x ~0.5)")


def check_tile_memory(tile_px: int, batch_size: int, bytes_per_px: int = 600) -> None:
    """An error when a batch of tiles cannot fit in this machine's memory (checked before any work starts).

    ``bytes_per_px`` is the model's peak activation memory per input pixel, rounded up from the shipped model.
    """
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    need = batch_size * tile_px**2 * bytes_per_px
    if need > 0.8 * total:
        fit = int((0.8 * total / (batch_size * bytes_per_px)) ** 0.5 // 256 * 256)
        head = (f"--tile-px {tile_px} with --batch-size {batch_size}: needs ~{need / 2**30:.0f} GiB, this machine "
                f"has {total / 2**30:.0f} GiB; ")
        if fit >= 256:
            raise InputError(head + f"use --tile-px {fit} or less")
        batch = int(0.8 * total // (tile_px**2 * bytes_per_px))
        if batch >= 1:
            raise InputError(head + f"use --batch-size {batch} or less")
        raise InputError(head + "use --batch-size 1 and a smaller --tile-px")


@main.command()
@click.argument("slides", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("-o", "--outdir", required=True, type=click.Path(path_type=Path),
              help="Folder for <stem>_suggest.geojson (import it into QuPath over the slide).")
@click.option("-m", "--model", "model_dir", default=None, type=click.Path(path_type=str),
              help="Model folder (default: the shipped model).")
@click.option("--boxes", type=int, default=20, show_default=True, help="Boxes to propose per slide.")
@click.option("--box-um", type=float, default=100.0, show_default=True,
              help="Side of each box in um (10 to 2000).")
@click.option("--regions", "old_regions", default=None, hidden=True)
@click.option("--region-um", "old_region_um", default=None, hidden=True)
@click.option("--mpp", type=float, default=None, help="Slide pixel size in um (when the file has none).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs that pronet-wsi did not write.")
@friendly_errors
def suggest(slides, outdir, model_dir, boxes, box_um, old_regions, old_region_um, mpp, device, overwrite) -> None:
    """Propose where to click: boxes where the model is least reliable, spread over the tissue and its types,
    each with the model's nuclei as points to correct (QuPath annotations; see the README's adaptation loop)."""
    from pronet_wsi.files import check_outputs
    from pronet_wsi.inference import InferenceConfig, Predictor
    from pronet_wsi.suggest import SuggestConfig
    from pronet_wsi.wsi.cohort import expand_inputs
    from pronet_wsi.wsi.pipeline import check_writable, suggest_slide

    if old_regions is not None or old_region_um is not None:
        raise click.UsageError("suggest --regions and --region-um are now --boxes (how many) and --box-um (their "
                               "side); --regions is train's GeoJSON of clicked areas")
    check_mpp_option(mpp)
    if boxes < 1:
        raise InputError(f"--boxes {boxes}: give at least 1 box to propose")
    if not 10 <= box_um <= 2000:
        raise InputError(f"--box-um {box_um:g}: give a box side between 10 and 2000 um")
    config = SuggestConfig(regions=boxes, region_um=box_um, candidates=max(160, 4 * boxes))
    items = expand_inputs(slides)
    check_outputs([outdir / f"{item.stem}_suggest.geojson" for item in items], [it.path for it in items], overwrite)
    check_writable(outdir)
    predictor = Predictor(model_dir, InferenceConfig(device=device))
    for item in items:
        out = outdir / f"{item.stem}_suggest.geojson"
        res = suggest_slide(item.path, out, predictor, config, mpp=mpp)
        click.echo(f"{Path(item.path).name}: {res['regions']} boxes (of {res['candidates']} scored) -> {out}")


@main.command()
@click.argument("outdir", type=click.Path(path_type=Path))
@click.option("-o", "--output", "output_csv", type=click.Path(path_type=Path), default=None,
              help="CSV to write (default: OUTDIR/summary.csv).")
@click.option("--manifest", type=click.Path(path_type=Path), default=None,
              help="Also list the manifest's slides that have no run record yet (status missing).")
@friendly_errors
def summary(outdir: Path, output_csv: Path | None, manifest: Path | None) -> None:
    """Merge the run records (<name>.json) of a `segment` OUTDIR into one CSV and print totals.

    Columns: name, slide, status (done / failed / missing), error, nuclei, tissue_area_mm2, nuclei_per_mm2,
    mean_area_um2, wall_time_s, mpx_per_s. Failed and missing slides are listed on stderr.
    """
    from pronet_wsi.wsi.cohort import format_totals, read_manifest, summary_rows, summary_totals, write_summary_csv

    rows = summary_rows(outdir, read_manifest(manifest) if manifest is not None else None)
    if not rows:
        raise InputError(f"{outdir}: no run records (<name>.json) here; run pronet-wsi segment -o {outdir} first")
    out = output_csv if output_csv is not None else outdir / "summary.csv"
    write_summary_csv(out, rows)
    for r in rows:
        if r["status"] != "done":
            click.echo(f"{r['status'].upper()} {r['slide'] or r['name']}: {r['error']}", err=True)
    click.echo(format_totals(summary_totals(rows)))
    click.echo(f"wrote {out}")
