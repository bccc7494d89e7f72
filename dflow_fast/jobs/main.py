"""``dflow-fast run``: the command line's arguments to :func:`~dflow_fast.jobs.runner.run`."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from .config import JobConfig, JobInputError
from .liveness import WorkerLost
from .runner import run


def main(args: argparse.Namespace) -> int:
    """Run the job the parsed ``args`` describe; a refusal prints its message (no traceback)
    and returns 2, before anything is written; a lost worker (rank 0) prints its message and
    exits with 1 at once, skipping the interpreter's teardown (the finished chunks kept)."""
    logging.basicConfig(level=logging.INFO, format="dflow-fast run: %(message)s")
    cfg = JobConfig(task=args.task, data=args.data, out=args.out, indices=args.indices,
                    model=args.model, batch=args.batch, steps=args.steps, solver=args.solver,
                    gradient=args.gradient, max_iter=args.max_iter, sigma=args.sigma,
                    alpha=args.alpha, seed=args.seed, dtype=args.dtype, device=args.device,
                    threads=args.threads, resume=args.resume, progress=not args.no_progress,
                    worker_timeout=args.worker_timeout)
    try:
        report = run(cfg)
    except JobInputError as e:
        print(f"dflow-fast run: error: {e}", file=sys.stderr)
        return 2
    except WorkerLost as e:
        print(f"dflow-fast run: error: {e}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # no interpreter teardown: destroying an NCCL communicator whose peer died can hang,
        # and every finished chunk is already on disk (fsync'ed)
        os._exit(1)
    if "summary" in report:  # rank 0
        s = report["summary"]
        print(f"{report['inputs']['n']} problems: {s['status']}, mean loss "
              f"{s['loss']['mean']}; wrote {cfg.out}/results.safetensors, report.json, "
              "report.md")
    return 0
