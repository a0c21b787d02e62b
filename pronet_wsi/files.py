"""Safe file writing on shared storage: atomic replace with fsync, umask-honouring modes, per-output locks,
and where a slide's outputs go (:class:`OutputPaths`).

Every output of the package goes through :func:`atomic_write` (or :func:`open_atomic` for streams), so a file
that exists is complete, and a crash leaves at most a ``.<name>.*.tmp`` file that :func:`sweep_temp` removes.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from pronet_wsi.errors import InputError

TMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give: 0644 under the usual umask 022


def fsync_path(path: Path) -> None:
    """Flush a file's data to disk (so a rename after it cannot expose an empty file after a crash)."""
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened (or fsynced)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def temp_path(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path``; on success the caller's file is fsynced and renamed onto ``path``.

    The temporary file is removed on every failure path (exceptions, KeyboardInterrupt).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.is_file():
            fsync_path(tmp_path)
            os.chmod(tmp_path, FILE_MODE)
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp_path)`` then rename into ``path``, so a crash never leaves a partial file."""
    with temp_path(path) as tmp:
        write(tmp)


def atomic_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def sweep_temp(folder: Path, name: str) -> list[Path]:
    """Remove leftover temporary files of output ``name`` in ``folder`` (from a killed or failed run)."""
    removed = []
    for p in Path(folder).glob(f".{name}.*{TMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p)
    return removed


class LockHeld(InputError):
    """Another live run holds the lock."""


class OutputLock:
    """An exclusive lock file (O_EXCL) with the owner's host, pid and start time.

    A lock whose owner is on this host and no longer alive is stale and taken over; a lock from another host is
    trusted until it is ``stale_after_s`` old (the owner refreshes nothing, so pick it above any run's length).
    """

    def __init__(self, path: Path, what: str, stale_after_s: float = 7 * 24 * 3600) -> None:
        self.path, self.what, self.stale_after_s = Path(path), what, stale_after_s
        self.held = False

    def acquire(self) -> OutputLock:
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, FILE_MODE)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and not self._stale(owner):
                    raise LockHeld(f"{self.what}: another run (pid {owner.get('pid')} on {owner.get('host')}, "
                                   f"started {owner.get('started')}) is writing it; wait for it to finish, or "
                                   f"delete {self.path} if that run is gone") from None
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(info))
            self.held = True
            return self
        raise LockHeld(f"{self.what}: could not take the lock {self.path}; delete it if no run is using it")

    def _owner(self) -> dict | None:
        try:
            return json.loads(self.path.read_text() or "{}") or None
        except (OSError, ValueError):
            return None  # unreadable or half-written: treated as stale

    def _stale(self, owner: dict) -> bool:
        try:
            age = time.time() - self.path.stat().st_mtime
        except OSError:
            return True
        if owner.get("host") == socket.gethostname():
            return not _alive(int(owner.get("pid", -1)))
        return age > self.stale_after_s

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.held = False

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def open_atomic_stream(path: Path) -> tuple[IO[bytes], Path]:
    """A binary stream to a temporary file beside ``path`` (for writers that stream); see :func:`commit`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    return os.fdopen(fd, "wb"), Path(tmp)


def commit(tmp: Path, path: Path) -> None:
    """fsync ``tmp``, give it the normal file mode and rename it onto ``path``."""
    fsync_path(tmp)
    os.chmod(tmp, FILE_MODE)
    os.replace(tmp, path)
    _fsync_dir(Path(path).parent)


def slide_stem(path: Path) -> str:
    name = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


@dataclass(frozen=True)
class OutputPaths:
    """Where one slide's outputs go in the output folder (``<stem>`` = the output name).

    geojson : the nuclei (``.geojson`` or ``.geojson.gz``). record : ``<stem>.json``, the run record. overlay,
    mask : the overlay and tissue-mask PNGs. tissue : the tissue annotation GeoJSON. labels : the label zarr.
    table : the nuclei Parquet table.
    parts : the hidden per-tile store of an unfinished run. lock : the hidden per-slide lock file.
    """

    geojson: Path
    record: Path
    overlay: Path
    mask: Path
    tissue: Path
    labels: Path
    table: Path
    parts: Path
    lock: Path

    @classmethod
    def of(cls, slide_path: Path, out_dir: Path, gzip_output: bool = False, name: str | None = None
           ) -> OutputPaths:
        """The paths for ``slide_path`` in ``out_dir``; ``name`` (default: the slide's stem) is the file stem."""
        stem = name or slide_stem(slide_path)
        out_dir = Path(out_dir)
        return cls(geojson=out_dir / (stem + (".geojson.gz" if gzip_output else ".geojson")),
                   record=out_dir / f"{stem}.json", overlay=out_dir / f"{stem}_overlay.png",
                   mask=out_dir / f"{stem}_tissue.png", tissue=out_dir / f"{stem}_tissue.geojson",
                   labels=out_dir / f"{stem}_labels.zarr", table=out_dir / f"{stem}_nuclei.parquet",
                   parts=out_dir / f".{stem}.parts",
                   lock=out_dir / f".{stem}.lock")

    def user_files(self) -> dict[str, str]:
        """The outputs a user sees (for the run record), by name."""
        return {k: str(v) for k, v in asdict(self).items() if k not in ("parts", "lock")}
