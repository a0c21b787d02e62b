"""Safe file writing on shared storage: atomic replace with fsync, umask-honouring modes, per-output locks,
and where a slide's outputs go (:class:`OutputPaths`).

Every output of the package goes through :func:`atomic_write` (or :func:`open_atomic_stream` for streams), so a file
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
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        raise _with_path(exc, path) from exc
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _with_path(exc: OSError, path: Path) -> OSError:
    """``exc`` with ``path`` as its file name when a writer raised it without one (e.g. a full disk)."""
    if exc.filename:
        return exc
    return OSError(exc.errno, exc.strerror or str(exc) or type(exc).__name__, str(path))


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
    try:
        fsync_path(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except OSError as exc:
        raise _with_path(exc, Path(path)) from exc
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


# -- outputs this package wrote ----------------------------------------------------------------------------------
OWNED_DIR = ".pronet-wsi-outputs"
"""Hidden folder beside the outputs: one small JSON per output name (size, mtime, sha256) that pronet-wsi wrote."""
TOOL_MARK = "pronet-wsi"
"""The ``"tool"`` value of every JSON run record (a record is recognised by its content, even when copied)."""


def _owned_note(path: Path) -> Path:
    return Path(path).parent / OWNED_DIR / f"{Path(path).name}.json"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def mark_owned(path: Path) -> None:
    """Record that this package has just written ``path`` (a file, or a folder such as a zarr store).

    The note (``OUTDIR/.pronet-wsi-outputs/<name>.json``) holds the size, mtime and sha256 of a file, so a file
    the user put there later under the same name is not taken for ours. Never fails the run that wrote ``path``.
    """
    path = Path(path)
    try:
        st = path.stat()
        info = {"name": path.name, "dir": path.is_dir(), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                "sha256": None if path.is_dir() else sha256_file(path)}
        note = _owned_note(path)
        note.parent.mkdir(exist_ok=True)
        atomic_text(note, json.dumps(info))
    except OSError:
        pass


def is_owned(path: Path) -> bool:
    """``path`` was written by pronet-wsi: a note of :func:`mark_owned` matches it, or it is a JSON run record
    marked ``"tool": "pronet-wsi"`` (or an older record: ``status`` done/failed and a ``slide`` object)."""
    path = Path(path)
    try:
        info = json.loads(_owned_note(path).read_text())
        st = path.stat()
        if info.get("dir"):
            if path.is_dir():
                return True
        elif path.is_file() and info.get("size") == st.st_size and (
                info.get("mtime_ns") == st.st_mtime_ns or info.get("sha256") == sha256_file(path)):
            return True
    except (OSError, ValueError, AttributeError):
        pass
    if path.suffix.lower() == ".json" and path.is_file():
        return is_run_record(path)
    return False


def is_run_record(path: Path) -> bool:
    """A JSON file whose content says pronet-wsi wrote it (see :data:`TOOL_MARK`)."""
    try:
        if Path(path).stat().st_size > 64 << 20:
            return False
        rec = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    if not isinstance(rec, dict):
        return False
    return rec.get("tool") == TOOL_MARK or (rec.get("status") in ("done", "failed")
                                            and isinstance(rec.get("slide"), dict) and "name" in rec)


def same_file(a: Path, b: Path) -> bool:
    """``a`` and ``b`` name one file (resolved paths, or the same inode when both exist)."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def check_outputs(outputs: list[Path], inputs: list[Path], overwrite: bool = False,
                  how: str = "pass --overwrite to replace it or choose another -o") -> None:
    """Refuse to write any of ``outputs`` that is one of ``inputs`` (always) or exists and was not written by
    pronet-wsi (unless ``overwrite``). Raises InputError naming the file and the fix."""
    resolved = [Path(p) for p in inputs]
    for out in outputs:
        out = Path(out)
        for src in resolved:
            if same_file(out, src):
                raise InputError(f"{out}: this output would overwrite the input {src}; choose another -o (inputs "
                                 "are never overwritten, not even with --overwrite)")
        if out.exists() or out.is_symlink():
            if out.is_dir() and not out.name.endswith(".zarr"):
                raise InputError(f"{out}: a folder is in the way of this output; choose another -o")
            if not overwrite and not is_owned(out):
                raise InputError(f"{out}: exists and was not written by pronet-wsi; {how}")


def check_report(path: Path, header: tuple[str, ...], inputs: tuple[Path, ...] = ()) -> None:
    """A report CSV may replace only a CSV pronet-wsi wrote (its first row is ``header``, possibly followed by
    more columns) or nothing."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give a CSV file name such as {path / 'scores.csv'}")
    for src in inputs:
        if same_file(path, src):
            raise InputError(f"{path}: the report would overwrite the input {src}; choose another -o")
    if not (path.exists() or path.is_symlink()):
        return
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            first = fh.readline(4096).strip()
    except (OSError, UnicodeDecodeError):
        first = ""
    if first != ",".join(header) and not first.startswith(",".join(header) + ","):  # a report of ours (a summary
        # of typed slides has class columns after the header), not merely a file of ours (a GeoJSON)
        raise InputError(f"{path}: exists and is not a CSV report pronet-wsi wrote; choose another -o "
                         "(or delete it)")


def describe_os_error(exc: OSError) -> str:
    """One line for an OS error: the path, what happened and what to do."""
    import errno

    where = exc.filename or ""
    what = exc.strerror or type(exc).__name__
    fixes = {errno.ENOSPC: "free space there or choose another -o", errno.EDQUOT: "free space (quota) or choose "
             "another -o", errno.ENOENT: "check the path (a folder on it does not exist)",
             errno.EACCES: "check permissions or choose another -o", errno.EPERM: "check permissions or choose "
             "another -o", errno.EROFS: "read-only file system; choose another -o",
             errno.ENOTDIR: "a part of the path is a file, not a folder; check the path",
             errno.EISDIR: "a folder is in the way; give a file name"}
    fix = fixes.get(exc.errno or -1, "check the path and the disk")
    return f"{where}: {what}; {fix}" if where else f"{what}; {fix}"
