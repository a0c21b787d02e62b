#!/bin/bash
# Segment a cohort of slides with a SLURM job array, then write one summary CSV.
#
# Each array task segments every N-th slide of the manifest (pronet-wsi segment --shard I/N), so the tasks need
# no coordination; a slide finished by an earlier (or killed and resubmitted) task is skipped, and a killed slide
# resumes from its finished tiles. A failed slide leaves OUTDIR/<name>.json with its error; the task then exits 1.
#
# From a login node (submits the array and a summary job that runs after it, whatever the array's outcome):
#     bash examples/hpc/slurm_array.sh slides.csv results/ 8                  # 8 array tasks
#     bash examples/hpc/slurm_array.sh slides.csv results/ 8 -m models/x --gzip   # extra segment options
# Or by hand:
#     sbatch --array=0-7 examples/hpc/slurm_array.sh slides.csv results/
#     pronet-wsi summary results/ --manifest slides.csv
#
# slides.csv: a header "path,mpp,output" (mpp and output optional) and one slide per line; relative paths are
# relative to the CSV's folder. Paths and OUTDIR must be on a file system every node sees.
# Extra sbatch options for the submit mode go in SBATCH_OPTIONS, e.g. SBATCH_OPTIONS="--partition=gpu --gres=gpu:1".
# PRONET_WSI is the command to run (default: pronet-wsi on PATH; or activate your environment below).
#
#SBATCH --job-name=pronet-wsi
#SBATCH --cpus-per-task=8
#SBATCH --mem=16G
#SBATCH --time=08:00:00
#SBATCH --output=pronet-wsi-%A_%a.log
##SBATCH --gres=gpu:1          # one GPU per task on a GPU partition (the model runs on it: --device auto)

set -euo pipefail
# source /path/to/venv/bin/activate
PRONET=${PRONET_WSI:-pronet-wsi}

MANIFEST=${1:?usage: slurm_array.sh MANIFEST.csv OUTDIR [TASKS] [segment options...]}
OUTDIR=${2:?usage: slurm_array.sh MANIFEST.csv OUTDIR [TASKS] [segment options...]}
shift 2
TASKS=4
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then
    TASKS=$1
    shift
fi

if [[ -z ${SLURM_JOB_ID:-} ]]; then
    # submit mode: the array, then the summary after it (afterany: also when some tasks failed)
    # shellcheck disable=SC2086
    array=$(sbatch --parsable --array=0-$((TASKS - 1)) ${SBATCH_OPTIONS:-} "$0" "$MANIFEST" "$OUTDIR" "$@")
    # shellcheck disable=SC2086
    summary=$(sbatch --parsable --dependency=afterany:"${array%%;*}" --job-name=pronet-wsi-summary \
        --cpus-per-task=1 --mem=2G --time=00:30:00 --output=pronet-wsi-summary-%j.log \
        --export=ALL,PRONET_STEP=summary ${SBATCH_OPTIONS:-} "$0" "$MANIFEST" "$OUTDIR")
    echo "array job ${array%%;*} ($TASKS tasks), summary job ${summary%%;*} -> $OUTDIR/summary.csv"
    exit 0
fi

if [[ ${PRONET_STEP:-} == summary ]]; then
    exec "$PRONET" summary "$OUTDIR" --manifest "$MANIFEST"
fi

# one array task: shard numbers start at 0 whatever the array's first index
SHARD=$((SLURM_ARRAY_TASK_ID - ${SLURM_ARRAY_TASK_MIN:-0}))
exec "$PRONET" segment --manifest "$MANIFEST" --shard "$SHARD/${SLURM_ARRAY_TASK_COUNT:?not an array job}" \
    -o "$OUTDIR" --quiet "$@"
