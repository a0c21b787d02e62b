"""examples/hpc on a real SLURM: the job-array script and the dask-jobqueue script (slow, opt-in).

Run with a working SLURM (sbatch, a partition that takes 1-core jobs) and ``PRONET_SLURM_TEST=1``::

    PRONET_SLURM_TEST=1 pytest -m slow tests/test_examples_hpc.py
"""

import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from wsi_fakes import small_slide, tiny_model_dir

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "hpc"
PRONET = Path(sys.executable).parent / "pronet-wsi"
SEGMENT_OPTS = ["--tile-px", "256", "--halo-px", "32"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("sbatch") is None or os.environ.get("PRONET_SLURM_TEST") != "1",
                       reason="needs SLURM (sbatch) and PRONET_SLURM_TEST=1"),
]


@pytest.fixture
def cohort(tmp_path):
    """Five small slides (s2.tif truncated), a manifest with relative paths, a tiny model. On a shared FS if
    PRONET_SLURM_TMP names one (the default tmp_path is fine for a single-node SLURM)."""
    root = Path(os.environ["PRONET_SLURM_TMP"]) / tmp_path.name if "PRONET_SLURM_TMP" in os.environ else tmp_path
    (root / "slides").mkdir(parents=True)
    for k in range(5):
        small_slide(root / "slides" / f"s{k}.tif", seed=k)
    bad = root / "slides" / "s2.tif"
    bad.write_bytes(bad.read_bytes()[:3000])
    (root / "slides.csv").write_text("path\n" + "".join(f"slides/s{k}.tif\n" for k in range(5)))
    return root, tiny_model_dir(root / "model")


def read_summary(path):
    with open(path, newline="") as fh:
        return {r["name"]: r for r in csv.DictReader(fh)}


def test_slurm_array_script(cohort):
    root, model = cohort
    env = {**os.environ, "PRONET_WSI": str(PRONET), "SBATCH_OPTIONS": "--cpus-per-task=1 --mem=1G"}
    res = subprocess.run(["bash", str(EXAMPLES / "slurm_array.sh"), "slides.csv", "out", "2", "-m", str(model),
                          *SEGMENT_OPTS], cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "2 tasks" in res.stdout
    summary = root / "out" / "summary.csv"
    deadline = time.time() + 300
    while not summary.exists() and time.time() < deadline:
        time.sleep(2)
    assert summary.exists(), [p.read_text() for p in root.glob("pronet-wsi-*.log")]
    rows = read_summary(summary)
    assert {k: r["status"] for k, r in rows.items()} == {"s0": "done", "s1": "done", "s2": "failed", "s3": "done",
                                                         "s4": "done"}
    assert "truncated" in rows["s2"]["error"]
    logs = sorted(p.name for p in root.glob("pronet-wsi-*_*.log"))
    assert len(logs) == 2 and logs[0].endswith("_0.log") and logs[1].endswith("_1.log")
    shard_lines = [line for p in root.glob("pronet-wsi-*_*.log") for line in p.read_text().splitlines()
                   if line.startswith("shard ")]
    assert sorted(shard_lines) == ["shard 0/2: 3 of 5 slides", "shard 1/2: 2 of 5 slides"]


def test_dask_jobqueue_script(cohort):
    pytest.importorskip("dask_jobqueue")
    root, model = cohort
    res = subprocess.run([sys.executable, str(EXAMPLES / "dask_jobqueue_slurm.py"), "slides.csv", "out", "--jobs",
                          "2", "--cores", "1", "--memory", "1GB", "--walltime", "00:10:00", "--", "-m", str(model),
                          *SEGMENT_OPTS], cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr  # s2 failed
    assert "ERROR" in res.stderr and "s2.tif" in res.stderr and "1 of 5 slides failed" in res.stderr
    rows = read_summary(root / "out" / "summary.csv")
    assert sorted(k for k, r in rows.items() if r["status"] == "done") == ["s0", "s1", "s3", "s4"]
    assert sorted(p.stem for p in (root / "out").glob("*.geojson")) == ["s0", "s1", "s3", "s4"]
