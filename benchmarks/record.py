"""What every result row and printed table records: the commit, the seed and the machine it ran on."""

from __future__ import annotations

import csv
import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN_COLUMNS = ("commit", "seed", "machine")


def commit() -> str:
    """Short hash of the checkout's HEAD, ``+dirty`` when tracked files differ from it ("unknown" outside git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def machine() -> str:
    """CPU model and count, and the GPU when torch sees one, e.g. ``Intel(R) Xeon(R) ... x2``."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            names = [ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    text = f"{cpu} x{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()}"
    try:
        import torch

        if torch.cuda.is_available():
            text += f" + {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return text


def run_info(seed: int | None) -> dict[str, str]:
    """The :data:`RUN_COLUMNS` of a row (``seed`` "" when the benchmark draws nothing at random)."""
    return {"commit": commit(), "seed": "" if seed is None else str(seed), "machine": machine()}


def banner(seed: int | None = None) -> str:
    """One line to print above a table: commit, seed and machine."""
    info = run_info(seed)
    return f"commit {info['commit']}, seed {info['seed'] or '-'}, machine {info['machine']}"


def append_row(path: Path, row: dict, seed: int | None) -> None:
    """Append ``row`` plus commit, seed and machine to a results CSV. A file with other columns is rewritten
    with the union of the columns (old rows get empty cells), so no row lands under a wrong header."""
    row = {**row, **run_info(seed)}
    path.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    header: list[str] = []
    if path.exists() and path.stat().st_size:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            header, rows = list(reader.fieldnames or []), list(reader)
    columns = header + [k for k in row if k not in header]
    if columns == header:
        with open(path, "a", newline="", encoding="utf-8") as fh:
            csv.DictWriter(fh, fieldnames=columns, restval="").writerow(row)
        return
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows([*rows, row])
    os.replace(tmp, path)


def smoke_skip(reason: str) -> None:
    """End a ``--smoke`` run that cannot run here (data absent) cleanly, saying why."""
    print(f"smoke: skipped, {reason}")
    raise SystemExit(0)
