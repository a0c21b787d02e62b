"""The four H&E datasets in ../shared/data, their splits and pixel sizes, read at the model's resolution.

Splits never mix images of one slide (MoNuSeg: the paper's; NuInsSeg: by organ; CoNSeP: by original tile;
Emory GBM40: by image number, no slide ids are published). ``test`` parts are scored once per finished model.
Points are the centroids of the instance labels; labels are used only for validation and test scores.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.record import ROOT, append_row, smoke_skip

DATA = ROOT.parent / "shared" / "data"
MODEL_MPP = 0.25
SMOKE_PX: int | None = None  # set by smoke(): load() gives the first image of a split, cropped to this side


@dataclass(frozen=True)
class Lab:
    """One dataset: where its images are, its pixel size and how its images split."""

    name: str
    mpp: float  # estimated where undocumented (see each folder's README)
    lab: str

    def files(self, split: str) -> list[tuple[Path, Path]]:
        """(image, label) paths of ``split`` (train / val / test)."""
        return [pair for pair in _pairs(self.name) if _split_of(self.name, pair[0].stem) == split]


LABS = {
    "monuseg": Lab("monuseg", 0.25, "TCGA (many sites)"),
    "nuinsseg": Lab("nuinsseg", 0.165, "Medical University of Vienna"),  # nucleus area 2.3x MoNuSeg's
    "emory": Lab("emory", 0.25, "Emory University Hospital"),
    "consep": Lab("consep", 0.25, "UHCW Coventry"),
}
NUINSSEG_VAL_ORGANS = ("epiglottis", "kidney", "melanoma")
NUINSSEG_TEST_ORGANS = ("liver", "pancreas", "tonsile")
CONSEP_VAL_TILES = (24, 25, 26, 27)


def available() -> bool:
    return all((DATA / d).is_dir() for d in ("monuseg", "nuinsseg", "glioma_emory", "consep"))


def smoke(side: int = 256) -> None:
    """A script's ``--smoke``: every split is its first image cropped to ``side`` px, and result rows go to a
    temporary folder; without ../shared/data the run ends here, cleanly."""
    global SMOKE_PX
    if not available():
        smoke_skip(f"datasets not found under {DATA}")
    SMOKE_PX = side


def _pairs(name: str) -> list[tuple[Path, Path]]:
    if name == "monuseg":
        return [(p, DATA / "monuseg" / "labels" / f"{p.stem}.png")
                for p in sorted((DATA / "monuseg" / "images").glob("*.tif"))]
    if name == "consep":
        return [(p, p.parent.parent / "labels" / f"{p.stem}.png")
                for part in ("train", "test") for p in sorted((DATA / "consep" / part / "images").glob("*.jpg"))]
    folder = DATA / ("glioma_emory" if name == "emory" else name)
    return [(p, folder / "labels" / p.name) for p in sorted((folder / "images").glob("*.png"))]


def _monuseg_split() -> dict[str, str]:
    raw = json.loads((DATA / "monuseg" / "splits" / "train_val_test.json").read_text())
    return {n.split("_", 1)[1].rsplit(".", 1)[0]: k for k in ("train", "val", "test") for n in raw[k]}


def _split_of(name: str, stem: str) -> str:
    if name == "monuseg":
        return _monuseg_split()[stem]
    if name == "consep":
        part, tile = stem.split("_")[:2]
        return "test" if part == "test" else "val" if int(tile) in CONSEP_VAL_TILES else "train"
    if name == "emory":
        n = int(stem.rsplit("_", 1)[1])
        return "train" if n <= 24 else "val" if n <= 30 else "test"
    organ = stem.split("_")[1]
    return "val" if organ in NUINSSEG_VAL_ORGANS else "test" if organ in NUINSSEG_TEST_ORGANS else "train"


def load(name: str, split: str, mpp: float = MODEL_MPP) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """[(stem, RGB uint8 image, uint32 instance map)] of one split, resampled to ``mpp``."""
    from pronet_wsi.images import read_image, read_labels
    from pronet_wsi.inference import resample_image, resample_labels

    lab = LABS[name]
    out = []
    for img_path, lab_path in lab.files(split)[: 1 if SMOKE_PX else None]:
        image, labels = read_image(img_path), read_labels(lab_path).astype(np.uint32)
        scale = lab.mpp / mpp
        if abs(scale - 1) > 1e-3:
            image = resample_image(image, scale)
            labels = resample_labels(labels, image.shape[:2])
        if SMOKE_PX:
            image, labels = image[:SMOKE_PX, :SMOKE_PX], labels[:SMOKE_PX, :SMOKE_PX]
        out.append((img_path.stem, image, labels))
    return out


def points_items(items: list[tuple[str, np.ndarray, np.ndarray]]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """[(stem, image, centroid points x, y)]: what a pathologist's clicks give."""
    from pronet_wsi.training.points import centroids_from_labels

    out = []
    for stem, image, labels in items:
        pts, _ = centroids_from_labels(labels)
        if len(pts):
            out.append((stem, image, pts))
    return out


def append_csv(path: Path, row: dict, seed: int | None) -> None:
    """Append ``row`` with commit, seed and machine to a results CSV (:func:`benchmarks.record.append_row`); a
    smoke run writes to a temporary folder instead of ``benchmarks/results``."""
    if SMOKE_PX:
        import tempfile

        path = Path(tempfile.mkdtemp(prefix="pronet-wsi-smoke-")) / path.name
    append_row(path, row, seed)
