"""The pieces under the jobs: per-problem randomness from (seed, index) alone, the command line's
choices against the package's, provenance in every report (the demo's too), the class task."""
from __future__ import annotations

import json
import re

import numpy as np
import torch

from dflow_fast import jobs
from dflow_fast.apps import provenance
from dflow_fast.apps.cli import build_parser
from dflow_fast.core.checks import GRADIENTS
from dflow_fast.core.plan import SOLVERS
from dflow_fast.jobs.config import JobConfig, problem_seed
from dflow_fast.jobs.problems import Solver
from dflow_fast.tasks import TASKS

from .helpers import TINY


def _solver(batch: int, start: int, n: int, task="inpaint_random", alpha=0.0):
    truth = torch.rand(n, 1, 8, 8) * 2 - 1
    cfg = JobConfig(task=task, data="-", out="-", batch=batch, alpha=alpha, seed=7)
    return Solver(cfg, truth, None, start, lambda t, x: -x, None, torch.device("cpu"),
                  torch.float32), truth


def test_problem_randomness_depends_on_seed_and_index_only():
    """The same problem (data index 5) gets the same observation, mask and initial noise in a
    chunk of 4 at position 3 as alone in a chunk of 1: nothing depends on batch neighbours."""
    a, truth = _solver(batch=4, start=2, n=4)
    b, _ = _solver(batch=1, start=5, n=1)
    b.truth = truth[3:4]
    pa, pb = a.problem(range(0, 4)), b.problem(range(0, 1))
    assert torch.equal(pa.y[3], pb.y[0]) and torch.equal(pa.operator.mask[3], pb.operator.mask[0])
    za, zb = a.initial_x0(pa.guess, range(0, 4), a.velocity), b.initial_x0(pb.guess, range(0, 1),
                                                                         b.velocity)
    assert torch.equal(za[3], zb[0])
    # different problems and seeds get different streams
    assert not torch.equal(za[2], za[3])
    assert problem_seed(7, 5, "noise") != problem_seed(8, 5, "noise")
    assert problem_seed(7, 5, "noise") != problem_seed(7, 5, "measurement")


def test_status_codes_cover_every_status_optimize_documents():
    """Chunk files store statuses as codes into STATUS_NAMES: every status OptimizeResult
    documents must have one, or a chunk holding it could not be written."""
    from dflow_fast.optim.samples import SUCCESS
    from dflow_fast.optimize import OptimizeResult
    doc = OptimizeResult.__doc__.split("``status[i]`` is one of:")[1].split("``success")[0]
    documented = set(re.findall(r'``"(\w+)"``', doc))
    assert documented >= set(SUCCESS) and documented <= set(jobs.STATUS_NAMES)


def test_cli_choices_are_the_packages():
    run = build_parser()._subparsers._group_actions[0].choices["run"]
    opts = {a.dest: a for a in run._actions}
    assert set(opts["solver"].choices) == set(SOLVERS)
    assert set(opts["gradient"].choices) == set(GRADIENTS)
    assert opts["gradient"].default == "auto"
    assert set(re.findall(r"\w+", opts["task"].help)) == set(TASKS)
    for name in jobs.DATASETS:
        assert name in opts["data"].help
    for name in jobs.BUNDLED:
        assert name in opts["model"].help
    args = build_parser().parse_args(["run", "--task", "sr4", "--data", "d", "--out", "o"])
    defaults = JobConfig(task="sr4", data="d", out="o")
    for field in ("batch", "steps", "solver", "gradient", "max_iter", "sigma", "alpha", "seed",
                  "dtype", "device", "threads", "model", "worker_timeout"):
        assert getattr(args, field) == getattr(defaults, field), field


def test_provenance_fields(monkeypatch):
    p = provenance.provenance("cpu")
    assert p["torch"] == torch.__version__ and p["device"] == "cpu"
    assert {"dflow_fast", "torch_cuda", "python", "commit", "dirty", "device_name"} <= set(p)
    if (provenance.PACKAGE_ROOT / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}", p["commit"])
    assert provenance.git_commit(provenance.PACKAGE_ROOT / "dflow_fast") == {
        "commit": None, "dirty": None}  # not a checkout's root
    monkeypatch.setenv("DFLOW_FAST_COMMIT", "abc123")
    assert provenance.git_commit()["commit"] == "abc123"


def test_demo_report_records_provenance(tmp_path):
    from dflow_fast.apps import demo
    report = demo.run(n=1, tasks=["denoise"], steps=1, max_iter=1, out=tmp_path,
                      reference=False, progress=False)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["provenance"]["torch"] == torch.__version__
    assert set(saved["provenance"]) >= {"commit", "dirty", "dflow_fast", "torch_cuda", "device"}
    assert report["provenance"]["commit"] == saved["provenance"]["commit"]


def test_class_task_on_unlabelled_images(tmp_path):
    """No labels in the file: each problem's requested class is drawn from (seed, index); the
    report gives the classifier's accuracy on them."""
    from dflow_fast.data import fashion_mnist
    images, _ = fashion_mnist("test", limit=2)
    path = tmp_path / "x.npy"
    np.save(path, images.numpy())
    report = jobs.run(data=str(path), out=str(tmp_path / "out"), **{**TINY, "task": "class"})
    results, _ = jobs.load_results(tmp_path / "out")
    expect = [int(torch.randint(10, (1,), generator=torch.Generator().manual_seed(
        problem_seed(0, i, "target")))) for i in range(2)]
    assert results["target"].tolist() == expect
    assert 0.0 <= report["quality"]["accuracy"]["D-Flow (dflow_fast)"] <= 1.0
