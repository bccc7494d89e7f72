"""Batch jobs: D-Flow over many problems, in chunks that survive a kill and shard over workers
(``dflow-fast run``; docs/jobs.md).

    from dflow_fast import jobs
    report = jobs.run(task="sr4", data="fashion-mnist:test", indices="0:64", out="runs/sr4")
    results, status_names = jobs.load_results("runs/sr4")   # x0, x1, loss, nit, ... by index

The same call in every worker of ``torchrun --nproc-per-node N`` shares the chunks out (worker r
solves chunks r, r + N, ...; gloo on the CPU, NCCL with one GPU per worker). Modules:
``config.py`` (JobConfig, validation, per-problem seeds, fingerprint), ``inputs.py`` (datasets,
image folders, array files, models, checked before any work), ``problems.py`` (one chunk's
problems and its optimize call), ``chunks.py`` (atomic chunk files, manifest entries, resume,
merge), ``dist.py`` (workers and devices), ``liveness.py`` (rank 0's watch over the other
workers' beats), ``report.py`` (report.json/md, grids), ``runner.py``
(``run``) and ``main.py`` (the command line's entry).
"""
from .chunks import load_results
from .config import DATASETS, JobConfig, JobInputError
from .inputs import BUNDLED
from .liveness import WorkerLost
from .problems import KEYS, STATUS_NAMES
from .runner import run

__all__ = ["run", "JobConfig", "JobInputError", "load_results", "DATASETS", "BUNDLED", "KEYS",
           "STATUS_NAMES", "WorkerLost"]
