"""Every benchmark script runs from the checkout with its documented command: ``python -m benchmarks.<name>
--smoke`` on tiny data (skipped cleanly, exit 0, when ../shared/data is absent). Two tests run them three at a
time: the light scripts, and (marked ``slow``) the three that start a subprocess, a Dask cluster or a training
epoch; ``-m "not slow"`` leaves those out."""

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = {"__init__", "record", "labs"}  # imported by the scripts, not run


def smoke_commands(tmp: Path) -> dict[str, list[str]]:
    return {
        "bench_inference": ["--smoke"],
        "bench_measurements": ["--smoke"],
        "bench_metrics": ["--smoke"],
        "bench_postprocess": ["--smoke"],
        "bench_stitch": ["--smoke"],
        "bench_pseudolabels": ["--smoke"],
        "runtimes": ["--smoke"],
        "int8": ["--smoke"],
        "halfres": ["--smoke"],
        "classical": ["--smoke"],
        "suggest_eval": ["--smoke"],
        "adapt": ["--lab", "consep", "--smoke", "-o", str(tmp / "adapt")],
        "multilab": ["--smoke", "pseudo", "--datasets", "monuseg"],
        "monuseg": ["--smoke", "run", "-o", str(tmp / "monuseg")],
        "types": ["--smoke"],
        "wsi": ["--smoke"],
        "cluster": ["--smoke"],
        "distill": ["--smoke", "-o", str(tmp / "distill")],
    }


def test_scripts_need_no_machine_specific_paths():
    scripts = sorted(p for p in (ROOT / "benchmarks").glob("*.py"))
    assert len(scripts) > 10
    for p in scripts:
        text = p.read_text()
        assert "sys.path.insert" not in text and "/work/venv" not in text, p.name
        if p.stem not in LIBRARIES:
            assert "--smoke" in text, p.name
    assert {p.stem for p in scripts} - LIBRARIES == set(smoke_commands(Path(".")))


HEAVY = {"wsi", "cluster", "monuseg", "distill"}  # a subprocess or a Dask cluster, or a training epoch: some 20 s each


def _run_smokes(commands: dict[str, list[str]]) -> None:
    def run(item):
        name, args = item
        res = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *args], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
        return name, res

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(run, commands.items()))
    failed = {name: (res.returncode, res.stderr[-2000:]) for name, res in results if res.returncode != 0}
    assert not failed
    for name, res in results:
        out = res.stdout + res.stderr
        assert "smoke: skipped" in out or ("commit " in out and "machine " in out), (name, out[-2000:])


@pytest.mark.benchmark
def test_every_light_benchmark_runs_its_smoke_mode(tmp_path):
    _run_smokes({k: v for k, v in smoke_commands(tmp_path).items() if k not in HEAVY})


@pytest.mark.benchmark
@pytest.mark.slow
def test_the_heavy_benchmarks_run_their_smoke_mode(tmp_path):
    _run_smokes({k: v for k, v in smoke_commands(tmp_path).items() if k in HEAVY})
