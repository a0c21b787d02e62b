"""Per-tile results on disk, so a killed run resumes where it stopped.

One ``.npz`` file per finished tile under ``OUTDIR/.<slide stem>.parts/``, written to a temporary name and
renamed, so a file that exists is complete. ``fingerprint.json`` records what the parts were computed from
(slide, model, settings); a store whose fingerprint differs is emptied before use.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np

from pronet_wsi.files import atomic_text, atomic_write
from pronet_wsi.instances import Instances

_FIELDS = ("centers_xy", "priority", "in_core", "area_px", "area_um2", "center_score", "foreground_mean",
           "coords", "offsets")
_MASK_FIELDS = ("bbox", "bits", "bit_offsets")
_TYPE_FIELDS = ("class_index", "class_prob")  # typed models only
_OPTIONAL_FIELDS = ("features", "cell_coords", "cell_offsets")  # measurements, cells


class TileStore:
    """A folder of per-tile results.

    Parameters
    ----------
    root : the folder (created).
    fingerprint : plain-JSON description of the run; parts from a different fingerprint are deleted.
        None opens an existing store as it is (tile tasks).
    """

    def __init__(self, root: Path, fingerprint: dict | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.damaged: list[Path] = []
        self.restarted = ""  # "slide, model" etc.: why the parts of an earlier run were deleted
        if fingerprint is None:
            return
        fp_path = self.root / "fingerprint.json"
        text = json.dumps(fingerprint, sort_keys=True, indent=1, default=str)
        old = fp_path.read_text() if fp_path.exists() else None
        if old != text:
            parts = [*self.root.glob("*.npz"), *self.root.glob(".*.tmp")]
            if parts:
                self.restarted = _differences(old, fingerprint)
            for p in parts:
                p.unlink(missing_ok=True)
            atomic_text(fp_path, text)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.npz"

    def done(self, verify: bool = False) -> set[str]:
        """Keys of the tiles whose results are on disk.

        ``verify``: check every file's checksums first; a damaged one (a disk fault, a truncated copy) is
        deleted, so its tile is redone, and listed in :attr:`damaged`.
        """
        keys = set()
        for p in self.root.glob("*.npz"):
            if p.name.startswith("."):
                continue
            if verify and not _intact(p):
                p.unlink(missing_ok=True)
                self.damaged.append(p)
                continue
            keys.add(p.stem)
        return keys

    def save(self, key: str, inst: Instances, bodies: list[str], stats: dict) -> None:
        """Write one tile's candidates, their GeoJSON feature bodies and its stats, atomically."""
        blob = "".join(bodies).encode()
        lens = np.array([len(b.encode()) for b in bodies], np.int64)
        arrays = {f: getattr(inst, f) for f in _FIELDS}
        if inst.bbox is not None:
            arrays.update({f: getattr(inst, f) for f in _MASK_FIELDS})
        if inst.class_index is not None:
            arrays.update({f: getattr(inst, f) for f in _TYPE_FIELDS})
        arrays.update({f: getattr(inst, f) for f in _OPTIONAL_FIELDS if getattr(inst, f) is not None})
        if inst.features is not None:
            arrays["feature_names"] = np.frombuffer(json.dumps(list(inst.feature_names)).encode(), np.uint8)
        arrays["text"] = np.frombuffer(blob, np.uint8)
        arrays["text_offsets"] = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        arrays["stats"] = np.frombuffer(json.dumps(stats).encode(), np.uint8)
        atomic_write(self.path(key), lambda tmp: write_npz(tmp, arrays))

    def load(self, key: str, masks: bool = False) -> Instances:
        with np.load(self.path(key)) as z:
            extra = {f: z[f] for f in _MASK_FIELDS if masks and f in z.files}
            extra.update({f: z[f] for f in _TYPE_FIELDS if f in z.files})
            extra.update({f: z[f] for f in _OPTIONAL_FIELDS if f in z.files})
            if "feature_names" in z.files:
                extra["feature_names"] = tuple(json.loads(z["feature_names"].tobytes().decode()))
            return Instances(**{f: z[f] for f in _FIELDS}, **extra)

    def load_candidates(self, key: str) -> tuple[np.ndarray, ...]:
        """(centers_xy, priority, coords, offsets) only (for stitching decisions)."""
        with np.load(self.path(key)) as z:
            return tuple(z[f] for f in ("centers_xy", "priority", "coords", "offsets"))

    def load_texts(self, key: str) -> list[str]:
        with np.load(self.path(key)) as z:
            blob, off = z["text"].tobytes(), z["text_offsets"]
        return [blob[a:b].decode() for a, b in zip(off[:-1], off[1:], strict=True)]

    def load_stats(self, key: str) -> dict:
        with np.load(self.path(key)) as z:
            return json.loads(z["stats"].tobytes().decode())

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def write_npz(path: Path, arrays: dict[str, np.ndarray], level: int = 1) -> None:
    """``np.savez_compressed`` at zlib level ``level``: numpy's fixed level 6 took 70 ms of a tile's ~1.5 s of work,
    level 1 takes 21 ms for files 22 % larger (benchmarks/RESULTS.md); ``np.load`` reads both."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=level) as zf:
        for name, value in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.asanyarray(value), allow_pickle=False)


def _differences(old_text: str | None, new: dict) -> str:
    """The keys of the fingerprint that changed, e.g. ``"settings (model, postprocess)"``."""
    try:
        old = json.loads(old_text or "")
    except ValueError:
        old = None
    if not isinstance(old, dict):
        return "settings (no readable fingerprint)"
    plain = json.loads(json.dumps(new, default=str))
    keys = sorted(k for k in {*old, *plain} if old.get(k) != plain.get(k))
    return f"settings ({', '.join(keys)})"


def _intact(path: Path) -> bool:
    """A part file whose zip members all pass their CRC check and hold the fields :meth:`TileStore.load` reads."""
    try:
        with zipfile.ZipFile(path) as zf:
            if zf.testzip() is not None:
                return False
            names = {n.removesuffix(".npy") for n in zf.namelist()}
        return {*_FIELDS, "text", "text_offsets", "stats"} <= names
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return False
