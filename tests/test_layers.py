"""The package's import graph: no circles, science free of torch/Dask/CLI, the run layer free of training."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "pronet_wsi"
SCIENCE = ["geometry", "tiling", "tissue", "postprocess", "instances", "stitching", "metrics", "overlay",
           "measurements", "cells",
           "training.pseudolabels", "training.targets", "training.refinement", "training.points"]
RUN_LAYER = ["wsi.plan", "wsi.pipeline", "wsi.cluster", "wsi.cohort", "wsi.tile_store", "wsi.assemble", "wsi.tile_task",
             "export", "table", "slide", "files", "progress"]
HEAVY = ("torch", "dask", "distributed", "click", "pronet_wsi.cli")


def _module(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """Every import (module level and inside functions) of every module of the package."""
    graph: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        name = _module(path)
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                base = node.module
                if node.level:
                    base = ".".join(name.split(".")[: -node.level] + [node.module])
                deps.add(base)
                deps.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
        graph[name] = deps
    return graph


def _internal(graph):
    return {m: {d for d in deps if d in graph and d != m and d != "pronet_wsi"} for m, deps in graph.items()}


def test_no_import_cycles():
    graph = _internal(import_graph())
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            assert state.get(d) != 1, "import cycle: " + " -> ".join([*stack, m, d])
            if d not in state:
                visit(d, [*stack, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_science_never_imports_torch_dask_or_the_cli():
    graph = import_graph()
    for m in SCIENCE:
        bad = {d for d in graph[f"pronet_wsi.{m}"] if d.split(".")[0] in HEAVY or d.startswith(HEAVY)}
        assert not bad, f"pronet_wsi.{m} imports {sorted(bad)}"


def test_only_the_cli_and_the_api_reach_up_into_the_run_layer():
    graph = _internal(import_graph())
    allowed = {"pronet_wsi.cli", "pronet_wsi"}
    for m, deps in graph.items():
        if m.startswith("pronet_wsi.wsi") or m in allowed:
            continue
        assert not {d for d in deps if d.startswith("pronet_wsi.wsi")}, f"{m} imports the run layer"


def test_run_layer_never_imports_training():
    graph = import_graph()
    for m in RUN_LAYER:
        bad = {d for d in graph[f"pronet_wsi.{m}"] if d.startswith("pronet_wsi.training")}
        assert not bad, f"pronet_wsi.{m} imports {sorted(bad)}"


def test_click_defaults_are_the_dataclass_defaults():
    """Every CLI default that is also a config field has one value (the dataclass's)."""
    from pronet_wsi.cli import main
    from pronet_wsi.inference import InferenceConfig
    from pronet_wsi.model import ModelConfig
    from pronet_wsi.tiling import TilingConfig
    from pronet_wsi.wsi.plan import SegmentConfig

    def defaults(command: str) -> dict:
        return {p.name: p.default for p in main.commands[command].params}

    seg, pred = defaults("segment"), defaults("predict")
    assert seg["tile_px"] == TilingConfig().tile_px
    assert seg["halo_px"] is None, "segment --halo-px defaults to the model's context_px"
    assert TilingConfig().halo_px == ModelConfig().context_px  # Python's default is the shipped model's context
    assert seg["batch_size"] == SegmentConfig().batch_size
    assert seg["workers"] == SegmentConfig().workers
    assert seg["measure_level"] == SegmentConfig().measure.level and seg["cells_um"] == SegmentConfig().measure.cells_um
    assert SegmentConfig().parquet is False  # a flag: off unless given
    assert seg["max_features_per_file"] == SegmentConfig().max_features_per_file
    assert seg["device"] == pred["device"] == InferenceConfig().device
    assert pred["window_px"] == InferenceConfig().window_px
    train = defaults("train")
    for name in ("width", "epochs", "lr", "batch_size", "patch_px", "patches_per_image", "mpp", "seed"):
        assert train[name] is None, f"train --{name} must take the recipe's value (TrainConfig)"


def test_public_api_names_resolve():
    import pronet_wsi

    for name in pronet_wsi.__all__:
        assert callable(getattr(pronet_wsi, name)), name
