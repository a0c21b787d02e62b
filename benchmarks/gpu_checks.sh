#!/usr/bin/env bash
# Issue 20's GPU checks in one run on a CUDA machine (~5-8 min on an H100; results under $OUT, else gpu-results/):
#   1. tests/test_cuda.py: GPU fp32 / fp16 nuclei vs the CPU's, batches vs single tiles, seam-exact tiling in fp16;
#   2. benchmarks/wsi.py on a 16384² synthetic slide, CUDA fp16, batch sizes 1-16 (goal >= 50 Mpx/s end to end).
#
#     bash benchmarks/gpu_wheels.sh                     # here, once: the packages the GPU image lacks, into .whl/
#     bash benchmarks/gpu_checks.sh                     # there, with .whl carried (device tool: carry [".whl"])
#     DEVICE=cpu SIZES=2048 BATCHES="1 4" bash benchmarks/gpu_checks.sh   # a dry run of the script on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
device=${DEVICE:-cuda}
sizes=${SIZES:-16384}
batches=${BATCHES:-1 2 4 8 16}
py=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/pronet-site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/pronet-site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 PRONET_WSI_CACHE_DIR=off
{ nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"; "$py" -c "import torch; print('torch', torch.__version__, \
'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"; \
  git log -1 --format='commit %h %s' 2>/dev/null; } | tee "$out/gpu.txt"
# numba compiles the outline tracing once (cached beside the sources): not inside the first timed run
"$py" -m benchmarks.wsi --smoke --device "$device" >/dev/null 2>>"$out/wsi_stderr.log" || true
"$py" -m pytest -q -s -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log"
for b in $batches; do
    "$py" -m benchmarks.wsi --sizes $sizes --device "$device" --batch-size "$b" --sample 8 \
        --workdir /tmp/pronet-gpu-bench 2>>"$out/wsi_stderr.log" | tee -a "$out/wsi_${device}.md"
done
