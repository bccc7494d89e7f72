"""Host synchronisations of the batched L-BFGS: at most one read of device values per batched
evaluation, counted on the CPU by dflow_fast.optim.syncs.HostReads (and on CUDA, where there is
one, by torch.cuda.set_sync_debug_mode); and the counter itself."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from dflow_fast.optim.lbfgs import LBFGSOptions, batched_lbfgs
from dflow_fast.optim.syncs import HostReads

F64 = torch.float64


def test_host_reads_counts_every_kind_of_read_and_restores_torch():
    x = torch.arange(6.0).reshape(2, 3) - 2.0
    plain_item = torch.Tensor.item
    reads = [lambda: x[0, 0].item(), lambda: x.tolist(), lambda: bool(x[0, 0]),
             lambda: float(x[1, 1]), lambda: int(x[1, 1]), lambda: x.nonzero(),
             lambda: torch.nonzero(x), lambda: x[x > 0], lambda: x.cpu(), lambda: x.numpy(),
             lambda: x.__setitem__(x < 0, 0.0), lambda: torch.masked_select(x, x > 0)]
    with HostReads() as hr:
        for k, read in enumerate(reads):
            read()
            assert hr.count == k + 1, f"read {k} not counted"
        # device-side work and reads of tensors made on the host from Python data are not reads
        y = torch.where(x > 0, x, -x).sum(0) * 2
        x[torch.tensor([0, 1])] = y[:3]
        torch.tensor([1.0, 2.0]).tolist()
        assert hr.count == len(reads)
        hr.mark()
        x.tolist()
        hr.mark()
        assert hr.between() == [1, 0] and hr.by_kind["tolist"] == 2
    assert torch.Tensor.item is plain_item and "item" not in torch.Tensor.__dict__
    assert isinstance(x.numpy(), np.ndarray)


def _problems(B: int, dtype, with_failures: bool):
    """B scaled Rosenbrock-type problems (their line searches extrapolate, zoom and end at
    different times); with_failures: sample 0 starts at its minimizer (stops at once), sample 1
    turns non-finite after a few evaluations."""
    gen = torch.Generator().manual_seed(3)
    scale = (0.3 + torch.rand(B, generator=gen) * torch.logspace(-1, 1, B)).to(dtype)[:, None]
    x0 = (torch.rand(B, 8, generator=gen) * 0.6 - 0.3).to(dtype)
    if with_failures:
        x0[0] = 1.0
    evals = torch.zeros(B, dtype=torch.int64)

    def evaluate(idx, X):  # device-side only: no reads of its own
        rows = torch.arange(B) if idx is None else idx
        evals.index_add_(0, rows, torch.ones_like(rows))
        s = scale[rows]
        a, b = X[:, :-1], X[:, 1:]
        r = b - a * a
        f = s[:, 0] * (100.0 * r * r + (1.0 - a) ** 2).sum(1)
        g = torch.zeros_like(X)
        g[:, :-1] = -400.0 * a * r - 2.0 * (1.0 - a)
        g[:, 1:] += 200.0 * r
        if with_failures:  # sample 1: NaN from its 5th evaluation on
            f = torch.where((rows == 1) & (evals[rows] >= 5), torch.nan, f)
        return f, s * g, X.clone()
    return evaluate, x0


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("with_failures", [False, True])
def test_lbfgs_reads_the_host_once_per_batched_evaluation(dtype, with_failures):
    evaluate, x0 = _problems(6, dtype, with_failures)
    calls = []

    def stop_one(smp, x, f, done):  # a host-side stop from the callback (as optimize's target)
        calls.append(list(done))
        if len(calls) == 3:
            smp.stop(done[-1], "target")
        return False

    with HostReads() as hr:
        def counted(idx, X):
            hr.mark()
            return evaluate(idx, X)
        x, f, x1, smp = batched_lbfgs(counted, x0, LBFGSOptions(max_iter=40, history_size=4),
                                      on_iteration=stop_one)
    per_eval = hr.between()  # after each evaluation, up to the next one (or the end)
    assert len(per_eval) == max(smp.nfev)  # every call held the sample that needed the most
    assert max(per_eval) <= 1, f"host reads per batched evaluation: {per_eval}"
    assert sum(per_eval) == len(per_eval)  # exactly the one read that sets the active set
    statuses = set(smp.status)
    assert "target" in statuses and len(statuses) >= 2
    if with_failures:
        assert smp.status[0] == "converged" and smp.nit[0] == 0
        assert smp.status[1] == "nonfinite" and torch.isfinite(x[1]).all()
    assert len(set(smp.nfev)) > 1  # the active set really shrank along the way


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lbfgs_synchronises_cuda_once_per_batched_evaluation():
    """What set_sync_debug_mode reports (blocking copies included), on an objective that does
    not synchronise by itself."""
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    c = torch.randn(6, 1, generator=gen).to(dev)
    w = torch.logspace(-1, 1, 6).to(dev)[:, None]
    marks = []

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        def evaluate(idx, X):
            marks.append(sum("synchroniz" in str(m.message) for m in caught))
            ci, wi = (c, w) if idx is None else (c[idx], w[idx])
            return (wi * (X - ci) ** 4).sum(1), 4 * wi * (X - ci) ** 3, X.clone()

        torch.cuda.set_sync_debug_mode("warn")
        try:
            x, f, x1, smp = batched_lbfgs(evaluate, torch.zeros(6, 5, device=dev),
                                          LBFGSOptions(max_iter=15))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        total = sum("synchroniz" in str(m.message) for m in caught)
    per_eval = [b - a for a, b in zip(marks, marks[1:] + [total])]
    assert len(per_eval) == max(smp.nfev) >= 3
    assert max(per_eval) <= 1, f"CUDA synchronisations per batched evaluation: {per_eval}"


def test_before_after_benchmark_harness(tmp_path):
    """bench/bench_lbfgs_sync.py, optimizer alone, with this checkout's L-BFGS as both 'before'
    and 'after': one read per evaluation each, the same iterates, results with provenance."""
    import json

    from bench import bench_lbfgs_sync
    from bench.lib import REPO_ROOT

    out = tmp_path / "sync.json"
    bench_lbfgs_sync.main(["--no-e2e", "--before-file", str(REPO_ROOT / bench_lbfgs_sync.SOURCE),
                           "--batch", "3", "--dim", "6", "--alone-iter", "6",
                           "--alone-repeats", "1", "--out", str(out)])
    doc = json.loads(out.read_text())
    alone = doc["optimizer_alone"]
    assert [r["impl"] for r in alone["rows"]] == ["before", "after"]
    for r in alone["rows"]:
        assert r["host_reads"]["optimizer_max"] == 1 and r["host_reads"]["evaluations"] >= 3
        assert r["time_s"] > 0 and r["own_ms_per_eval"] > 0
    assert alone["x_equal"] and alone["status_equal"] and doc["end_to_end"] is None
    assert doc["meta"]["torch"] == torch.__version__ and "command" in doc
    assert "| after |" in out.with_suffix(".md").read_text()
