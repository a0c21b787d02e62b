"""The one progress bar of the package: tqdm on stderr, shown only when asked for and stderr is a terminal."""

from __future__ import annotations

import sys
from typing import Any


def progress_bar(total: int, desc: str, unit: str, *, initial: int = 0, enabled: bool = True,
                 leave: bool = False) -> Any:
    """A ``tqdm`` bar; disabled (a no-op with the same methods) when ``enabled`` is False or stderr is not a
    terminal, so batch logs and SLURM output stay free of bar redraws."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=leave,
                disable=not (enabled and sys.stderr.isatty()))
