"""JSON text of many numbers at once: nuclei outlines and measurements written by a compiled kernel.

A tile's ~3,000 nuclei carry ~100,000 outline coordinates and ~100,000 measurement values. Writing them through
Python floats (``ndarray.tolist`` + ``json.dumps`` / ``repr``) took ~80 ms a tile plus the cyclic garbage
collector's passes over the millions of short-lived objects (benchmarks/RESULTS.md): more than a third of a tile's
post-processing. These kernels write the same characters from integers of units of the last decimal kept:
``k = rint(value * 10**decimals)`` is what numpy's ``round`` computes, and the shortest text that reads back as
``k / 10**decimals`` (Python's ``repr``) is that decimal with its trailing zeros dropped, while ``|k| < 10**15``.
"""

from __future__ import annotations

import json

import numba
import numpy as np

_MAX_UNITS = 1e15  # |k| below this: at most 15 significant digits, repr gives the decimal itself
_SIZE = 24  # bytes one number may need: sign, 15 digits, point, a margin


@numba.njit(cache=True, nogil=True, inline="always")
def _put_number(out: np.ndarray, pos: int, k: int, negative: bool, decimals: int, as_int: bool) -> int:
    """Write ``k / 10**decimals`` at ``out[pos:]`` as Python's repr of that float (``12.0``, ``-0.5``, ``3.25``),
    or as an integer (``as_int``, ``k`` a multiple of ``10**decimals``); returns the position after it."""
    if negative:
        out[pos] = 45  # -
        pos += 1
    a = -k if k < 0 else k
    scale = 1
    for _ in range(decimals):
        scale *= 10
    whole, frac = a // scale, a % scale
    n, t = 1, whole // 10
    while t:
        n += 1
        t //= 10
    for j in range(n - 1, -1, -1):
        out[pos + j] = 48 + whole % 10
        whole //= 10
    pos += n
    if as_int:
        return pos
    out[pos] = 46  # .
    pos += 1
    if frac == 0:
        out[pos] = 48
        return pos + 1
    d = decimals
    while frac % 10 == 0:
        frac //= 10
        d -= 1
    for j in range(d - 1, -1, -1):
        out[pos + j] = 48 + frac % 10
        frac //= 10
    return pos + d


@numba.njit(cache=True, nogil=True)
def _ring_bytes(units: np.ndarray, negative: np.ndarray, offsets: np.ndarray, ok: np.ndarray,
                out: np.ndarray) -> np.ndarray:
    """``[[[x,y],...]]`` of each ring where ``ok`` (nothing elsewhere) into ``out``; returns each ring's end.
    ``units`` (V, 2) int64 hundredths of a px; a ring of whole numbers only is written as integers."""
    n = len(offsets) - 1
    ends = np.zeros(n, np.int64)
    pos = 0
    for i in range(n):
        if ok[i]:
            a, b = offsets[i], offsets[i + 1]
            integral = True
            for v in range(a, b):
                if units[v, 0] % 100 != 0 or units[v, 1] % 100 != 0:
                    integral = False
                    break
            out[pos] = 91
            out[pos + 1] = 91
            pos += 2
            for v in range(a, b):
                if v > a:
                    out[pos] = 44
                    pos += 1
                out[pos] = 91
                pos += 1
                for c in range(2):
                    if c:
                        out[pos] = 44
                        pos += 1
                    k = units[v, c]
                    neg = k < 0 if integral else negative[v, c]
                    pos = _put_number(out, pos, k, neg, 2, integral)
                out[pos] = 93
                pos += 1
            out[pos] = 93
            out[pos + 1] = 93
            pos += 2
        ends[i] = pos
    return ends


def ring_texts_rounded(coords: np.ndarray, offsets: np.ndarray, ok: np.ndarray) -> list[str]:
    """GeoJSON Polygon ``coordinates`` text, ``[[[x,y],...]]``, of each ring of ragged ``coords`` / ``offsets``
    where ``ok`` ("" elsewhere), rounded to 0.01 px as ``np.round`` does and written as ``json.dumps`` writes the
    rounded floats (integers where a whole ring is integral)."""
    n = len(offsets) - 1
    if n <= 0:
        return []
    scaled = np.rint(np.asarray(coords, np.float64).reshape(-1, 2) * 100.0)
    if not np.all(np.abs(scaled) < _MAX_UNITS):
        raise ValueError("outline coordinates beyond 1e13 px")
    units = scaled.astype(np.int64)
    out = np.empty(len(units) * 2 * (_SIZE + 3) + 4 * n + 1, np.uint8)
    ends = _ring_bytes(units, np.signbit(scaled), np.asarray(offsets, np.int64), np.asarray(ok, np.bool_), out)
    text = out[: ends[-1]].tobytes().decode("ascii")
    starts = np.concatenate([[0], ends[:-1]]).tolist()
    return [text[a:b] for a, b in zip(starts, ends.tolist(), strict=True)]


@numba.njit(cache=True, nogil=True, inline="always")
def _product_error(a: float, b: float, p: float) -> float:
    """``a * b - p`` exactly, for ``p`` the rounded product (Dekker's two-product)."""
    c = 134217729.0 * a
    ah = c - (c - a)
    al = a - ah
    c = 134217729.0 * b
    bh = c - (c - b)
    bl = b - bh
    return ((ah * bh - p) + ah * bl + al * bh) + al * bl


@numba.njit(cache=True, nogil=True)
def _member_bytes(values: np.ndarray, decimals: np.ndarray, keys: np.ndarray, key_ends: np.ndarray,
                  out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``key:value,...`` of each row of ``values`` (N, C) (non-finite values left out) into ``out``; returns each
    row's end and whether a value of the row is too large, or lies too near a rounding tie without being one
    exactly, for ``rint`` to agree with Python's ``round`` for sure (an exact tie, such as an area of 8.53125 µm²
    at 4 decimals, rounds half to even in both)."""
    n, m = values.shape
    ends = np.zeros(n, np.int64)
    unsure = np.zeros(n, np.bool_)
    pos = 0
    for i in range(n):
        first = True
        for c in range(m):
            v = values[i, c]
            if not np.isfinite(v):
                continue
            scale = 10.0 ** decimals[c]
            y = v * scale
            ay = abs(y)
            if ay >= _MAX_UNITS:
                unsure[i] = True
                continue
            half = ay - np.floor(ay) - 0.5
            if abs(half) < 1e-6 + ay * 1e-12 and (half != 0.0 or _product_error(v, scale, y) != 0.0):
                unsure[i] = True
                continue
            r = np.rint(y)
            if not first:
                out[pos] = 44
                pos += 1
            first = False
            k0 = key_ends[c - 1] if c else 0
            for j in range(k0, key_ends[c]):
                out[pos] = keys[j]
                pos += 1
            out[pos] = 58  # :
            pos += 1
            pos = _put_number(out, pos, int(r), np.signbit(r), int(decimals[c]), False)
        ends[i] = pos
    return ends, unsure


def member_texts(columns: list[tuple[str, np.ndarray, int]], n: int) -> list[str]:
    """The JSON members ``"name":value,...`` of each of ``n`` rows from (name, values, decimals) columns: each
    finite value as ``repr(round(value, decimals))`` (the float Python's ``round`` gives), non-finite ones left
    out."""
    if n == 0:
        return []
    if not columns:
        return [""] * n
    keys = [(json.dumps(name, ensure_ascii=False).encode("utf-8"), nd) for name, _, nd in columns]
    values = np.stack([np.asarray(col, np.float64).reshape(n) for _, col, _ in columns], axis=1)
    decimals = np.array([nd for _, nd in keys], np.int64)
    key_bytes = np.frombuffer(b"".join(k for k, _ in keys), np.uint8)
    key_ends = np.cumsum([len(k) for k, _ in keys]).astype(np.int64)
    per_row = int(key_ends[-1]) + len(keys) * (_SIZE + 2)
    out = np.empty(n * per_row + 1, np.uint8)
    ends, unsure = _member_bytes(values, decimals, key_bytes, key_ends, out)
    data = out[: ends[-1]].tobytes()
    starts = np.concatenate([[0], ends[:-1]]).tolist()
    texts = [data[a:b].decode("utf-8") for a, b in zip(starts, ends.tolist(), strict=True)]
    for i in np.flatnonzero(unsure).tolist():  # rare: the row the plain way
        texts[i] = ",".join(f"{k.decode('utf-8')}:{round(float(v), nd)!r}"
                            for (k, nd), v in zip(keys, values[i].tolist(), strict=True) if np.isfinite(v))
    return texts
