import json

import numpy as np
import pytest

from pronet_wsi.texts import member_texts, ring_texts_rounded


def _python_ring(ring: np.ndarray) -> str:
    """What json.dumps writes for a ring rounded by numpy: integers when the whole ring is integral."""
    r = np.round(ring, 2)
    return json.dumps([(r.astype(np.int64) if np.all(r == np.rint(r)) else r).tolist()], separators=(",", ":"))


def _python_members(columns, n: int) -> list[str]:
    return [",".join(f"{json.dumps(name, ensure_ascii=False)}:{round(float(col[i]), nd)!r}"
                     for name, col, nd in columns if np.isfinite(col[i])) for i in range(n)]


def _rings(rng, n: int, kind: int) -> tuple[np.ndarray, np.ndarray]:
    lens = rng.integers(4, 14, n)
    rings = []
    for length in lens:
        t = np.linspace(0, 2 * np.pi, length)[:-1]
        ring = rng.uniform(-5, 3000, 2) + rng.uniform(0.02, 9) * np.stack([np.cos(t), np.sin(t)], 1)
        if kind == 1:
            ring = np.round(ring * 2) / 2  # halves: "12.5", "12.0"
        elif kind == 2:
            ring = np.round(ring) + rng.choice([0, 0, 0, 0.005, -0.004, 0.125, 1e-9], ring.shape)
        elif kind == 3:
            ring = np.round(ring)  # a whole ring of integers
        rings.append(np.vstack([ring, ring[:1]]))
    return np.vstack(rings), np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)


@pytest.mark.parametrize("kind", [0, 1, 2, 3])
def test_ring_texts_are_what_json_writes(kind):
    rng = np.random.default_rng(kind)
    coords, offsets = _rings(rng, 60, kind)
    ok = rng.random(60) < 0.9
    got = ring_texts_rounded(coords, offsets, ok)
    want = [_python_ring(coords[offsets[i]:offsets[i + 1]]) if ok[i] else "" for i in range(60)]
    assert got == want
    assert ring_texts_rounded(coords, offsets[:1], ok[:0]) == []


def test_ring_texts_write_negative_zero_and_integers_as_json_does():
    coords = np.array([[-0.001, 0.0], [1.0, 0.0], [1.0, 1.0], [-0.001, 0.0],  # -0.0 in a ring of floats
                       [0.5, 0.5], [-0.001, -2.0], [3.0, 0.0], [-0.001, 0.0]])
    offsets = np.array([0, 4, 8])
    got = ring_texts_rounded(coords, offsets, np.ones(2, bool))
    assert got == [_python_ring(coords[:4]), _python_ring(coords[4:])]
    assert got[0] == "[[[0,0],[1,0],[1,1],[0,0]]]"  # integral after rounding: integers, no "-0"
    assert got[1].startswith("[[[0.5,0.5],[-0.0,-2.0]")


def test_member_texts_are_what_round_and_repr_write():
    rng = np.random.default_rng(1)
    n = 500
    specials = [np.nan, np.inf, -np.inf, -0.0, 0.0, -1e-7, 1e-7, 2.675, 1.005, 0.125, 0.5, 1.5, 2.5, 1e14, 3e16, -7.0]
    columns = [
        ("Area µm^2", rng.integers(0, 4000, n) / 32.0, 3),  # exact binary ties at 3 decimals (8.53125 µm²)
        ("Area px^2", rng.integers(0, 5000, n) / 2.0, 2),
        ("score \"quoted\"", rng.random(n).astype(np.float32), 4),  # float32 widened
        ("wide", rng.normal(0, 1e5, n), 4),
        ("ties", (rng.integers(-10**6, 10**6, n) + 0.5) / 1e4, 4),  # decimal ties that are not binary ones
        ("special", rng.choice(specials, n), 4),
        ("none kept", np.full(n, np.nan), 2),
        ("integers", rng.integers(-50, 50, n).astype(float), 0),
    ]
    assert member_texts(columns, n) == _python_members(columns, n)
    parsed = json.loads("{" + member_texts([(k, c[:1], nd) for k, c, nd in columns[:2]], 1)[0] + "}")
    assert set(parsed) == {"Area µm^2", "Area px^2"}


def test_member_texts_of_nothing():
    assert member_texts([("a", np.zeros(0), 2)], 0) == []
    assert member_texts([], 3) == ["", "", ""]
    assert member_texts([("a", np.array([np.nan, 1.25]), 1)], 2) == ["", '"a":1.2']
