"""The solver core on its own: the grid, the plan, one step's VJP against autograd, and the one
step loop's stored states."""
from __future__ import annotations

import pytest
import torch

from dflow_fast.core.autodiff import vjp
from dflow_fast.core.plan import SOLVERS, make_grid, make_plan
from dflow_fast.core.steps import advance, initial_state, step, step_vjp
from tests.helpers import make_velocity, rel_err

F64 = torch.float64


@pytest.mark.parametrize("solver", ["euler", "midpoint"])
@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_step_vjp_equals_autograd(solver, kind):
    velocity, shape = make_velocity(kind, F64)
    x = torch.randn(3, *shape, dtype=F64)
    a = torch.randn(3, *shape, dtype=F64)
    plan = make_plan(solver, 4, 0.0, 1.0, None, x)
    params = tuple(velocity.parameters())
    a_prev, gp = step_vjp(velocity, plan, 2, x, a, params)
    xl = x.clone().requires_grad_(True)
    ref = torch.autograd.grad(step(velocity, plan, 2, xl), (xl, *params), a)
    assert rel_err(a_prev, ref[0]) <= 1e-12
    for g, r in zip(gp, ref[1:]):
        assert rel_err(g, r) <= 1e-12


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_advance_is_one_loop_for_every_solver(solver):
    """Two segments equal one, and the store holds what the stored adjoint needs."""
    velocity, shape = make_velocity("mlp", F64)
    x0 = torch.randn(2, *shape, dtype=F64)
    plan = make_plan(solver, 5, 0.0, 1.0, None, x0)
    with torch.no_grad():
        whole = advance(velocity, plan, 0, 5, initial_state(plan, x0))
        store: list = []
        mid = advance(velocity, plan, 0, 2, initial_state(plan, x0), store)
        parts = advance(velocity, plan, 2, 5, mid)
    for w, p in zip(whole, parts):
        assert torch.equal(w, p)
    expected = {"euler": 2, "midpoint": 4, "reversible_heun": 3,
                "reversible_euler": 2, "reversible_midpoint": 2}[solver]
    assert len(store) == expected


def test_vjp_of_an_output_without_graph_is_none():
    x = torch.randn(3, requires_grad=True)
    assert vjp(torch.ones(3), (x,), torch.ones(3)) == (None,)
    w, = vjp(2 * x, (x,), torch.ones(3))
    assert torch.equal(w, torch.full((3,), 2.0))


@pytest.mark.parametrize("args, match", [
    (dict(steps=0), "steps must be an int >= 1"),
    (dict(steps=None), "pass steps"),
    (dict(steps=2, t0=1.0, t1=1.0), "must be finite and differ"),
    (dict(steps=None, time_grid=[0.0, 0.5, 0.4, 1.0]), "strictly monotone"),
    (dict(steps=3, time_grid=[0.0, 1.0]), "disagrees with time_grid"),
])
def test_bad_grid(args, match):
    kw = dict(t0=0.0, t1=1.0, time_grid=None) | args
    with pytest.raises(ValueError, match=match):
        make_grid(kw["steps"], kw["t0"], kw["t1"], kw["time_grid"])


def test_plan_times_and_identity():
    x = torch.randn(2, 3, dtype=torch.float32)
    plan = make_plan("midpoint", 4, 0.0, 1.0, None, x)
    assert plan.times.dtype == torch.float32 and plan.times.shape == (9,)
    assert float(plan.tmid(1)) == pytest.approx(0.375) and plan.h(3) == pytest.approx(0.25)
    other = make_plan("midpoint", 4, 0.0, 1.0, None, x)
    assert plan != other and len({plan, other}) == 2  # hashed by identity (auto keys on it)
