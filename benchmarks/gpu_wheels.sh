#!/usr/bin/env bash
# The wheels pronet-wsi needs that the GPU machines' Python (3.12, PyTorch with CUDA, numpy, scipy, scikit-image,
# scikit-learn, numba, tifffile, pyarrow, click, ...) lacks, downloaded here into .whl/ for benchmarks/gpu_checks.sh.
# Versions: this checkout's .venv where it has the package, else the pin below. Needs pip and a package registry.
#
#     bash benchmarks/gpu_wheels.sh          # then carry .whl to the GPU machine with the working tree
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python; [ -x "$py" ] || py=python3
# name==version of each package: the .venv's, so the GPU run uses what the tests here used
pins=$("$py" -m pip list --format=freeze 2>/dev/null || true)
want="dask distributed donfig geojson google-crc32c imagecodecs importlib_metadata locket numcodecs openslide-bin
      openslide-python partd shapely tblib tiffslide tornado zarr zict"
mkdir -p .whl
for name in $want; do
    spec=$(printf '%s\n' "$pins" | grep -i "^${name}==" | head -1 || true)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "${spec:-$name}"
done
du -sh .whl
