"""Segment a cohort on SLURM through Dask: dask-jobqueue starts the workers as SLURM jobs, this process is the client.

    pip install "pronet-wsi[cluster]"          # dask-jobqueue
    python examples/hpc/dask_jobqueue_slurm.py slides.csv results/ --jobs 4 --gpu -- -m models/pronet-multilab

Every job runs one Dask worker (``processes=1``) with ``--cores`` threads and, with ``--gpu``, one GPU
(``--gres=gpu:1``; SLURM sets CUDA_VISIBLE_DEVICES, so the worker's model runs on its own GPU). Each worker
loads the model once. Tiles of one slide and slides of the cohort are spread over all workers; this process
opens each slide for its thumbnail and writes the GeoJSONs, so run it on a node that sees the slides and the
output folder (a login node or a small job), with the workers' nodes able to reach it (``--interface`` picks
its network interface, e.g. ib0). Options after ``--`` go to ``pronet-wsi segment``.

It then calls the same entry point as the command line, ``pronet-wsi segment --manifest ... --scheduler
ADDRESS``, and ``pronet-wsi summary``; the exit code is segment's (1 when a slide failed).
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("manifest", help="CSV of slides (path, optional mpp and output columns)")
    p.add_argument("outdir", help="output folder (shared file system)")
    p.add_argument("--jobs", type=int, default=4, help="SLURM jobs = Dask workers (default 4)")
    p.add_argument("--cores", type=int, default=8, help="CPU cores (= Dask threads) per job (default 8)")
    p.add_argument("--memory", default="32GB", help="memory per job (default 32GB)")
    p.add_argument("--walltime", default="08:00:00", help="time limit per job (default 08:00:00)")
    p.add_argument("--gpu", action="store_true", help="one GPU per job (--gres=gpu:1)")
    p.add_argument("--queue", default=None, help="SLURM partition")
    p.add_argument("--account", default=None, help="SLURM account")
    p.add_argument("--interface", default=None, help="network interface the workers reach this process on")
    p.add_argument("--job-extra", action="append", default=[], help="extra #SBATCH line, e.g. --job-extra=--qos=low")
    return p.parse_args(argv), extra


def run_pronet(args: list[str]) -> int:
    """``pronet-wsi ARGS`` in this process; returns its exit code."""
    from pronet_wsi.cli import main

    try:
        main.main(args=args, prog_name="pronet-wsi")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    from dask_jobqueue import SLURMCluster

    directives = [*(["--gres=gpu:1"] if args.gpu else []), *args.job_extra]
    cluster = SLURMCluster(cores=args.cores, processes=1, memory=args.memory, walltime=args.walltime,
                           queue=args.queue, account=args.account, interface=args.interface,
                           job_name="pronet-wsi-worker", job_extra_directives=directives, python=sys.executable,
                           scheduler_options={"dashboard_address": ":0"})
    with cluster:
        cluster.scale(jobs=args.jobs)
        print(f"scheduler {cluster.scheduler_address}; {args.jobs} worker jobs submitted", file=sys.stderr)
        code = run_pronet(["segment", "--manifest", args.manifest, "-o", args.outdir,
                           "--scheduler", cluster.scheduler_address, "--quiet", *extra])
    run_pronet(["summary", args.outdir, "--manifest", args.manifest])
    return code


if __name__ == "__main__":  # required: Dask may start processes that import this file
    sys.exit(main())
