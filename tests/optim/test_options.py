"""The optimizers' settings: options dataclasses, the flat keywords of optimize() on top of them,
and validation that names the field; the batched L-BFGS on its own, without a solver."""
from __future__ import annotations

import pytest
import torch

import dflow_fast as df
from dflow_fast.optim.adam import batched_adam
from dflow_fast.optim.lbfgs import LBFGSOptions, batched_lbfgs, default_max_eval

F64 = torch.float64


def _problem():
    torch.manual_seed(0)
    velocity = torch.nn.Linear(4, 4).double()
    target = torch.randn(3, 4, dtype=F64)
    x0 = torch.randn(3, 4, dtype=F64)
    return (lambda t, x: velocity(x)), (lambda x1: (x1 - target).pow(2).sum(1)), x0


@pytest.mark.parametrize("optimizer, options, flat", [
    ("lbfgs", df.LBFGSOptions(max_iter=4, history_size=3, lr=0.5),
     dict(max_iter=4, history_size=3, lr=0.5)),
    ("adam", df.AdamOptions(max_iter=5, lr=0.1), dict(max_iter=5, lr=0.1)),
])
def test_options_object_equals_flat_keywords(optimizer, options, flat):
    velocity, cost, x0 = _problem()
    a = df.optimize(velocity, cost, x0, steps=2, optimizer=optimizer, options=options)
    b = df.optimize(velocity, cost, x0, steps=2, optimizer=optimizer, **flat)
    assert torch.equal(a.x0, b.x0) and a.status == b.status and a.nit.tolist() == b.nit.tolist()
    assert a.extra["options"] == b.extra["options"]
    assert a.extra["options"]["max_iter"] == flat["max_iter"]


def test_flat_keywords_override_the_options_object():
    velocity, cost, x0 = _problem()
    res = df.optimize(velocity, cost, x0, steps=2, options=df.LBFGSOptions(max_iter=7),
                      max_iter=2)
    assert res.extra["options"]["max_iter"] == 2 and int(res.nit.max()) <= 2
    assert res.extra["options"]["max_eval"] == default_max_eval(2)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(optimizer="adam", history_size=5), TypeError, r"\['history_size'\].*'adam'"),
    (dict(max_iters=5), TypeError, r"\['max_iters'\]"),
    (dict(options=df.AdamOptions()), TypeError, "must be a LBFGSOptions, got AdamOptions"),
    (dict(options=df.LBFGSOptions(max_iter=0)), ValueError, "max_iter must be an int >= 1"),
    (dict(optimizer="adam", options=df.AdamOptions(betas=(0.9, 1.5))), ValueError, "betas"),
    (dict(lr=float("nan")), ValueError, "lr must be a finite number > 0"),
    (dict(tolerance_change=-1.0), ValueError, "tolerance_change must be a number >= 0"),
    (dict(optimizer="sgd"), ValueError, "unknown optimizer 'sgd'"),
])
def test_bad_options_are_refused_before_any_work(kwargs, exc, match):
    calls = []

    def velocity(t, x):
        calls.append(1)
        return x

    with pytest.raises(exc, match=match):
        df.optimize(velocity, lambda x1: x1.pow(2).sum(1), torch.randn(2, 3), steps=2, **kwargs)
    assert calls == []


def test_reference_takes_the_same_options():
    velocity, cost, x0 = _problem()
    a = df.reference.optimize(velocity, cost, x0, steps=2, options=df.LBFGSOptions(max_iter=3))
    b = df.reference.optimize(velocity, cost, x0, steps=2, max_iter=3)
    assert torch.equal(a.x0, b.x0)


@pytest.mark.parametrize("run", [batched_lbfgs, batched_adam], ids=["lbfgs", "adam"])
def test_optimizers_alone_on_separate_quadratics(run):
    """No solver involved: f_i(x) = 0.5 (x - c_i)^T diag(s_i) (x - c_i), minimizer c_i."""
    torch.manual_seed(1)
    c = torch.randn(4, 6, dtype=F64)
    s = torch.rand(4, 6, dtype=F64) + 0.5

    def evaluate(idx, X):
        ci, si = (c, s) if idx is None else (c[idx], s[idx])
        return (0.5 * si * (X - ci) ** 2).sum(1), si * (X - ci), X.clone()

    opts = LBFGSOptions(max_iter=50) if run is batched_lbfgs else df.AdamOptions(max_iter=400)
    x, f, x1, smp = run(evaluate, torch.zeros(4, 6, dtype=F64), opts)
    tol = 1e-4 if run is batched_lbfgs else 1e-2  # L-BFGS stops on a loss change < 1e-9
    torch.testing.assert_close(x, c, rtol=0, atol=tol)
    assert all(st in ("converged", "max_iter") for st in smp.status) and smp.B == 4
