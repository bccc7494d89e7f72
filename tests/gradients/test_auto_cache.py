"""gradient="auto" is the default, and its measuring step runs once per velocity: the graph bytes
are cached weakly on the velocity object, keyed by per-sample shape, dtype, device, solver,
autocast dtype, parameters and conditioning; the split is recomputed per solve, and every
gradient stays exact."""
from __future__ import annotations

import functools
import gc
import inspect
import math
import weakref

import pytest
import torch

import dflow_fast as df
from dflow_fast.gradients import auto
from dflow_fast.gradients.common import find_params

from tests.gradients.test_auto import solve_with_plan
from tests.helpers import make_velocity, rel_err

F64 = torch.float64


class Counting(torch.nn.Module):
    """A velocity module that counts its calls."""

    def __init__(self, kind="conv", dtype=F64):
        super().__init__()
        self.net, self.shape = make_velocity(kind, dtype)
        self.n = 0

    def forward(self, t, x):
        self.n += 1
        return self.net(t, x)


def calls_of(v: Counting, fn) -> int:
    before = v.n
    fn()
    return v.n - before


def grad_solve(v, x0, **kw):
    x = x0.clone().requires_grad_(True)
    x1 = df.solve(v, x, **kw)
    return torch.autograd.grad(x1.square().sum() + x1.sin().sum(), [x, *find_params(v)])


def test_auto_is_the_default_everywhere():
    from dflow_fast.apps import cli, demo
    for fn in (df.solve, df.optimize, demo.run, demo.run_task):
        assert inspect.signature(fn).parameters["gradient"].default == "auto"
    assert cli.build_parser().parse_args(["demo"]).gradient == "auto"
    v, shape = make_velocity("mlp", F64)
    v.requires_grad_(False)
    res = df.optimize(v, lambda x1: x1.square().sum(1), torch.randn(2, *shape, dtype=F64),
                      steps=2, max_iter=2)
    assert res.extra["gradient"] == "auto"


def test_default_solve_measures_once_per_velocity_and_key():
    v = Counting()
    steps, per_solve = 5, 2 * 5  # midpoint: two evaluations per step, the graph kept
    x = torch.randn(3, *v.shape, dtype=F64)
    assert calls_of(v, lambda: grad_solve(v, x, steps=steps)) == per_solve + 2  # + one step
    assert calls_of(v, lambda: grad_solve(v, x, steps=steps)) == per_solve
    # another batch size, step count or grid reuses the per-sample measurement
    assert calls_of(v, lambda: grad_solve(v, x[:2], steps=steps)) == per_solve
    assert calls_of(v, lambda: grad_solve(v, x, steps=3)) == 6
    # a new per-sample shape, dtype or solver is measured once more
    y = torch.randn(3, 2, 4, 4, dtype=F64)
    assert calls_of(v, lambda: grad_solve(v, y, steps=steps)) == per_solve + 2
    v.float()
    xf = x.float()
    assert calls_of(v, lambda: grad_solve(v, xf, steps=steps)) == per_solve + 2
    assert calls_of(v, lambda: grad_solve(v, xf, steps=steps, solver="euler")) == steps + 1
    assert calls_of(v, lambda: grad_solve(v, xf, steps=steps, autocast=torch.bfloat16)) \
        == per_solve + 2
    assert calls_of(v, lambda: grad_solve(v, xf, steps=steps, autocast=torch.bfloat16)) \
        == per_solve


def test_cached_measurement_still_follows_each_solves_budget():
    v = Counting()
    x = torch.randn(2, *v.shape, dtype=F64, requires_grad=True)
    _, plan = solve_with_plan(v, x, "midpoint", math.inf)
    assert auto.memo(plan).split == auto.Split(8, 0)
    before = v.n
    _, plan = solve_with_plan(v, x, "midpoint", 0)
    assert auto.memo(plan).split == auto.Split(0, 8)
    _, plan = solve_with_plan(v, x, "midpoint", 1e5)
    assert 0 < auto.memo(plan).split.graph < 8
    assert v.n - before == 2 * 2 * 8  # two forward sweeps without a graph, no measurement
    # the same measurement whatever the budget: the estimate of the split scales with the batch
    graph_per_sample = auto.graph_bytes(df.core.velocity.CheckedVelocity(v), plan, x, ())
    assert graph_per_sample > 0


@pytest.mark.parametrize("solver", ["euler", "midpoint", "reversible_heun", "reversible_midpoint"])
def test_default_equals_backprop_with_a_warm_cache(solver):
    v = Counting()
    for batch in (3, 2):  # the second solve reuses the measurement at another batch size
        x0 = torch.randn(batch, *v.shape, dtype=F64)
        a = grad_solve(v, x0, steps=4, solver=solver)
        b = grad_solve(v, x0, steps=4, solver=solver, gradient="backprop")
        for p, q in zip(a, b):
            assert q.norm() > 0 and rel_err(p, q) <= 1e-12


def test_optimize_pays_the_measuring_step_once():
    v = Counting("mlp")
    v.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    y = torch.randn(4, *v.shape, generator=g, dtype=F64)
    x0 = torch.randn(4, *v.shape, generator=g, dtype=F64)
    cost = lambda x1: (x1 - y).square().sum(1)  # noqa: E731
    kw = dict(steps=4, max_iter=8)
    a = df.optimize(v, cost, x0, **kw)  # default: auto, measured in the first evaluation
    b = df.optimize(v, cost, x0, gradient="backprop", **kw)
    assert a.velocity_calls == b.velocity_calls + 2
    # the measuring step is no sample's evaluation: nfe is backprop's, cached or not
    assert a.extra["measuring_calls"] == 2 and torch.equal(a.nfe, b.nfe)
    assert rel_err(a.x0, b.x0) <= 1e-12 and a.status == b.status
    c = df.optimize(v, cost, x0, **kw)  # a later run: nothing left to measure
    assert c.velocity_calls == b.velocity_calls and rel_err(c.x0, b.x0) <= 1e-12
    assert c.extra["measuring_calls"] == 0 and torch.equal(c.nfe, a.nfe)


def test_the_cache_is_weak_and_keys_a_bound_method_on_its_object():
    v = Counting("mlp")
    x = torch.randn(2, *v.shape, dtype=F64)
    grad_solve(v, x, steps=2)
    assert v in auto._GRAPH_BYTES
    # its own key (the function joins it), then found again through a new method object
    assert calls_of(v, functools.partial(grad_solve, v.forward, x, steps=2)) == 2 * 2 + 2
    assert calls_of(v, functools.partial(grad_solve, v.forward, x, steps=2)) == 2 * 2
    ref = weakref.ref(v)
    n = len(auto._GRAPH_BYTES)
    del v
    gc.collect()
    assert ref() is None and len(auto._GRAPH_BYTES) == n - 1


def test_a_velocity_that_cannot_be_a_weak_key_is_measured_every_time():
    class Unhashable:
        __hash__ = None

        def __init__(self):
            self.net, self.shape = make_velocity("mlp", F64)
            self.n = 0

        def __call__(self, t, x):
            self.n += 1
            return self.net(t, x)

    v = Unhashable()
    x = torch.randn(2, *v.shape, dtype=F64)
    for _ in range(2):
        before = v.n
        grads = grad_solve(v, x, steps=3)
        assert v.n - before == 2 * 3 + 2
    ref = grad_solve(v, x, steps=3, gradient="backprop")
    assert all(rel_err(p, q) <= 1e-12 for p, q in zip(grads, ref))
