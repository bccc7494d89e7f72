"""Bad input gets a clear error naming the argument, before any velocity evaluation
(docs/design.md section 7)."""
from __future__ import annotations

import math

import pytest
import torch

import dflow_fast as df


class Counting:
    def __init__(self, fn=lambda t, x: -x):
        self.fn, self.calls = fn, 0

    def __call__(self, t, x):
        self.calls += 1
        return self.fn(t, x)


X = torch.randn(3, 4)
COST = lambda x1: x1.pow(2).sum(1)  # noqa: E731


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(steps=0), ValueError, "steps must be an int >= 1"),
    (dict(steps=-2), ValueError, "steps"),
    (dict(steps=2.5), ValueError, "steps"),
    (dict(steps=True), ValueError, "steps"),
    (dict(steps=3, solver="rk4"), ValueError, "unknown solver 'rk4'"),
    (dict(steps=3, gradient="continuous"), ValueError, "unknown gradient 'continuous'"),
    (dict(steps=3, t0=0.5, t1=0.5), ValueError, "t0 and t1"),
    (dict(steps=3, t1=math.inf), ValueError, "t0 and t1"),
    (dict(time_grid=[0.0, 0.5, 0.4, 1.0]), ValueError, "strictly monotone"),
    (dict(time_grid=[0.0]), ValueError, "at least 2"),
    (dict(time_grid=torch.zeros(2, 2)), ValueError, "1-D"),
    (dict(time_grid=[0.0, math.nan]), ValueError, "non-finite"),
    (dict(steps=2, time_grid=[0.0, 0.3, 0.6, 1.0]), ValueError, "disagrees"),
], ids=lambda v: str(v) if isinstance(v, dict) else None)
def test_solve_rejects_bad_arguments(kwargs, exc, match):
    v = Counting()
    with pytest.raises(exc, match=match):
        df.solve(v, X, **kwargs)
    with pytest.raises(exc, match=match):
        df.optimize(v, COST, X, **kwargs)
    assert v.calls == 0


@pytest.mark.parametrize("x0, exc, match", [
    (torch.tensor([[1.0, math.nan], [0.0, 1.0]]), ValueError, r"non-finite entries in sample\(s\) \[0\]"),
    (torch.tensor([[1.0, 0.0], [math.inf, 1.0]]), ValueError, r"sample\(s\) \[1\]"),
    (torch.ones(3, 2, dtype=torch.int64), TypeError, "floating-point"),
    (torch.tensor(1.0), ValueError, r"shape \[B, \*S\]"),
    (torch.ones(0, 3), ValueError, "B >= 1"),
    ([[1.0, 2.0]], TypeError, "torch.Tensor"),
], ids=["nan", "inf", "int", "scalar", "empty", "list"])
def test_bad_x0(x0, exc, match):
    v = Counting()
    with pytest.raises(exc, match=match):
        df.solve(v, x0, steps=2)
    with pytest.raises(exc, match=match):
        df.optimize(v, COST, x0, steps=2)
    assert v.calls == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(optimizer="sgd"), "unknown optimizer 'sgd'"),
    (dict(max_iter=0), "max_iter must be an int >= 1"),
    (dict(max_iter=1.5), "max_iter"),
    (dict(max_eval=0), "max_eval"),
    (dict(history_size=0), "history_size"),
    (dict(lr=-1.0), "lr must be a finite number > 0"),
    (dict(lr=math.nan), "lr"),
    (dict(tolerance_grad=-1.0), "tolerance_grad"),
    (dict(tolerance_change=math.nan), "tolerance_change"),
], ids=lambda v: str(v) if isinstance(v, dict) else None)
def test_optimize_rejects_bad_options(kwargs, match):
    v = Counting()
    with pytest.raises(ValueError, match=match):
        df.optimize(v, COST, X, steps=2, **kwargs)
    assert v.calls == 0


def test_solve_needs_steps_or_grid():
    with pytest.raises(ValueError, match="pass steps"):
        df.solve(Counting(), X)


def test_non_callables_are_rejected():
    with pytest.raises(TypeError, match="velocity must be callable"):
        df.solve("not a function", X, steps=2)
    with pytest.raises(TypeError, match="cost must be callable"):
        df.optimize(Counting(), None, X, steps=2)
    with pytest.raises(TypeError, match="regularization must be callable"):
        df.optimize(Counting(), COST, X, steps=2, regularization=0.1)


@pytest.mark.parametrize("fn, exc, match", [
    (lambda t, x: x[:, :2], ValueError, r"x is \(3, 4\) torch.float32.*returned \(3, 2\)"),
    (lambda t, x: x.double(), ValueError, "returned .* torch.float64"),
    (lambda t, x: x.sum(), ValueError, r"returned \(\)"),
    (lambda t, x: x.tolist(), TypeError, "must return a tensor"),
], ids=["shape", "dtype", "scalar", "list"])
def test_velocity_output_is_checked_at_its_first_call(fn, exc, match):
    v = Counting(fn)
    with pytest.raises(exc, match=match):
        df.solve(v, X, steps=3)
    assert v.calls == 1
    with pytest.raises(exc, match=match):
        df.optimize(Counting(fn), COST, X, steps=3)


@pytest.mark.parametrize("cost, match", [
    (lambda x1: x1.pow(2).sum(), r"one value per sample, shape \[3\], got \(\)"),
    (lambda x1: x1.pow(2), r"shape \[3\], got \(3, 4\)"),
    (lambda x1: x1.pow(2).sum(1)[:2], r"got \(2,\)"),
    (lambda x1: 1.0, "got float"),
], ids=["scalar", "unreduced", "short", "float"])
def test_cost_must_return_one_value_per_sample(cost, match):
    with pytest.raises(ValueError, match=match):
        df.optimize(Counting(), cost, X, steps=2)


def test_cost_that_ignores_x1():
    with pytest.raises(ValueError, match="does not depend on x1"):
        df.optimize(Counting(), lambda x1: torch.zeros(3), X, steps=2)


def test_prior_and_blend_arguments():
    with pytest.raises(ValueError, match="ChiPrior weight"):
        df.ChiPrior(-1.0)
    with pytest.raises(ValueError, match="ChiPrior weight"):
        df.ChiPrior(math.inf)
    v = Counting()
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        df.backward_blend(v, X, alpha=1.5)
    with pytest.raises(ValueError, match="x1_guess has non-finite"):
        df.backward_blend(v, X * math.nan)
    assert v.calls == 0
