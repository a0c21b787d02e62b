"""Cost of the stitching decisions (pass 1 of assembly) at whole-slide density, with outlines.

A synthetic slide region of ``--side`` px holds nuclei on a jittered 30 px lattice (~650 per 768 px core).
Every tile sees each nucleus whose centre lies in its core grown by the match radius, with its own jitter of
the centre (up to ``--jitter`` px) and of the outline, as two tiles' predictions differ at a seam. Prints the
time per tile and checks that every nucleus is kept exactly once.

    python -m benchmarks.bench_stitch --side 16384
"""

from __future__ import annotations

import time

import click
import numpy as np

from benchmarks.record import banner
from pronet_wsi.stitching import Candidates, Resolver
from pronet_wsi.tiling import TileGrid, TilingConfig


def tile_candidates(order: int, core, centres: np.ndarray, reach: float, jitter: float, rng) -> tuple:
    """Candidates of one tile (16-gon outlines of radius 9-12 px) and the true nucleus ids they show."""
    x, y = centres[:, 0], centres[:, 1]
    sel = np.nonzero((x >= core.x0 - reach) & (x < core.x1 + reach) & (y >= core.y0 - reach) & (y < core.y1 + reach))[0]
    seen = centres[sel] + rng.uniform(-jitter, jitter, (len(sel), 2))
    ang = np.linspace(0, 2 * np.pi, 17)[None, :]
    rad = rng.uniform(9, 12, (len(sel), 1))
    rings = np.stack([seen[:, :1] + rad * np.cos(ang), seen[:, 1:] + rad * np.sin(ang)], -1).reshape(-1, 2)
    ring = np.concatenate([[0], np.cumsum(np.full(len(sel), 17))])
    edge = np.minimum.reduce([seen[:, 0] - core.x0, core.x1 - seen[:, 0], seen[:, 1] - core.y0,
                              core.y1 - seen[:, 1]]) + 128
    return Candidates(order, seen, edge, rings, ring), sel


@click.command()
@click.option("--side", default=16384)
@click.option("--tile-px", default=1024)
@click.option("--jitter", default=3.0, help="Per-tile jitter of each centre (px).")
@click.option("--seed", default=0)
@click.option("--smoke", is_flag=True, help="A 2048 px region in 512 px tiles (does it run?).")
def main(side: int, tile_px: int, jitter: float, seed: int, smoke: bool) -> None:
    if smoke:
        side, tile_px = 2048, 512
    click.echo(banner(seed))
    rng = np.random.default_rng(seed)
    g = np.arange(15, side - 15, 30, dtype=float)  # 30 px: not a divisor of the core size, seams cut nuclei
    centres = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2) + rng.uniform(-8, 8, (len(g) ** 2, 2))
    grid = TileGrid((side, side), TilingConfig(tile_px, 128))
    tiles = list(grid)
    order = {t.index: k for k, t in enumerate(tiles)}
    t0 = time.perf_counter()
    built = {t.index: tile_candidates(order[t.index], t.core, centres, 8.0, jitter, rng) for t in tiles}
    t_build = time.perf_counter() - t0
    resolver = Resolver(lambda i: built[i][0] if i in built else None, grid.neighbours, 8.0)
    kept_ids = []
    t0 = time.perf_counter()
    for t in tiles:
        resolver.forget([i for i in order if i[0] < t.index[0] - 2])
        kept_ids.append(built[t.index][1][resolver.keep(t.index)])
    t_stitch = time.perf_counter() - t0
    ids = np.concatenate(kept_ids)
    lost = len(centres) - len(np.unique(ids))
    doubled = len(ids) - len(np.unique(ids))
    n_cand = sum(len(b[1]) for b in built.values())
    click.echo("| region | tiles | nuclei | candidates | stitch s | ms / tile | lost | doubled |")
    click.echo("|---|---|---|---|---|---|---|---|")
    click.echo(f"| {side} x {side} | {len(tiles)} | {len(centres)} | {n_cand} | {t_stitch:.2f} | "
               f"{1000 * t_stitch / len(tiles):.1f} | {lost} | {doubled} |")
    click.echo(f"(building the synthetic candidates took {t_build:.1f} s, not counted)")


if __name__ == "__main__":
    main()
