"""gradient="auto": exact whatever the memory budget, backprop's saved bytes when everything fits,
the adjoint's (or the reversible sweep's) when nothing does, and recovery from out-of-memory errors
(injected on the CPU as torch.cuda.OutOfMemoryError)."""
from __future__ import annotations

import gc
import logging
import math
import weakref

import pytest
import torch

import dflow_fast as df
from dflow_fast.gradients import auto
from dflow_fast.gradients.auto import Costs, Split, allocate
from dflow_fast.gradients.common import find_params
from dflow_fast.core.plan import make_plan
from dflow_fast.core.velocity import CheckedVelocity
from dflow_fast.gradients.dispatch import run

from tests.helpers import make_velocity, rel_err
from tests.test_solve import saved_bytes

F64 = torch.float64
SOLVERS = ["euler", "midpoint", "reversible_heun", "reversible_euler", "reversible_midpoint"]
#: budgets in bytes for the conv velocity below (batch 2, 8 steps, float64): none of the graph,
#: part of it, all of it. A state is 480 bytes; one step's graph about 20-80 KB.
BUDGETS = {"zero": 0, "states": 9_000, "part": 100_000, "huge": 1e12, "inf": math.inf}


def solve_with_plan(velocity, x0, solver, budget, steps=8, **kw):
    """solve(..., gradient="auto") through ode.run, keeping the plan to inspect its split."""
    plan = make_plan(solver, steps, 0.0, 1.0, None, x0, None, gradient="auto", **kw)
    params = find_params(velocity)
    x1 = run(CheckedVelocity(velocity), plan, x0, "auto", params, True, memory_budget=budget)
    return x1, plan


@pytest.mark.parametrize("budget", list(BUDGETS))
@pytest.mark.parametrize("solver", SOLVERS)
def test_auto_equals_backprop_at_every_budget(solver, budget):
    velocity, shape = make_velocity("conv", F64)
    x0 = torch.randn(2, *shape, dtype=F64)
    W = torch.randn(shape, dtype=F64, requires_grad=True)
    out = {}
    for gradient in ("backprop", "auto"):
        x = x0.clone().requires_grad_(True)

        def v(t, y):  # a closed-over tensor: found by auto like by the adjoint
            return velocity(t, y) + 0.3 * torch.tanh(W) * y

        kw = dict(memory_budget=BUDGETS[budget]) if gradient == "auto" else {}
        x1 = df.solve(v, x, steps=8, solver=solver, gradient=gradient, **kw)
        loss = (x1 ** 2).sum() + x1.sin().sum()
        out[gradient] = (x1.detach(), torch.autograd.grad(loss, [x, W, *velocity.parameters()]))
    assert rel_err(out["auto"][0], out["backprop"][0]) <= 1e-12
    for a, b in zip(out["auto"][1], out["backprop"][1]):
        assert b.norm() > 0 and rel_err(a, b) <= 1e-10


@pytest.mark.parametrize("solver", SOLVERS)
def test_split_follows_the_budget(solver):
    velocity, shape = make_velocity("conv", F64)
    x0 = torch.randn(2, *shape, dtype=F64, requires_grad=True)
    splits = {name: auto.memo(solve_with_plan(velocity, x0, solver, b)[1]).split
              for name, b in BUDGETS.items()}
    assert splits["huge"] == splits["inf"] == Split(8, 0)
    assert 0 < splits["part"].graph < 8
    if solver in ("euler", "midpoint"):
        assert splits["zero"] == Split(0, 8)
    else:
        assert splits["zero"] == Split(0, 0, 8)
        assert splits["states"].graph == 0 and splits["states"].stored > 0
    graph = [splits[n].graph for n in ("zero", "states", "part", "huge")]
    assert graph == sorted(graph)


@pytest.mark.parametrize("solver", ["euler", "midpoint", "reversible_heun", "reversible_midpoint"])
def test_saved_bytes_match_backprop_and_adjoint_at_the_extremes(solver):
    velocity, shape = make_velocity("conv", torch.float32)
    x0 = torch.randn(4, *shape, requires_grad=True)

    def bytes_of(gradient, **kw):
        return saved_bytes(lambda: df.solve(velocity, x0, steps=6, solver=solver,
                                            gradient=gradient, **kw))

    assert bytes_of("auto", memory_budget=1e12) == bytes_of("backprop")
    low = "adjoint" if solver in ("euler", "midpoint") else "reversible"
    assert bytes_of("auto", memory_budget=0) == bytes_of(low)
    mid = bytes_of("auto", memory_budget=bytes_of("backprop") / 2)
    assert bytes_of(low) < mid < bytes_of("backprop")


@pytest.mark.parametrize("solver", SOLVERS)
def test_graph_estimate_is_close_to_what_backprop_saves(solver):
    """The measured per-step bytes times N is within 5% of backprop's saved storages (each storage
    once, weights and x0 excluded: memory that exists anyway)."""
    velocity, shape = make_velocity("conv", F64)
    x0 = torch.randn(3, *shape, dtype=F64, requires_grad=True)
    skip = {t.untyped_storage().data_ptr() for t in (x0, *velocity.parameters())}
    sizes = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            sizes[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        x1 = df.solve(velocity, x0, steps=8, solver=solver, gradient="backprop")
    _, plan = solve_with_plan(velocity, x0, solver, 1e12)
    assert auto.memo(plan).estimate == pytest.approx(sum(sizes.values()), rel=0.05)
    del x1


@pytest.mark.parametrize("solver", ["midpoint", "reversible_midpoint"])
def test_measuring_step_frees_its_graph_without_the_garbage_collector(solver):
    """The step that measures the graph's bytes must not leave its graph to the cyclic garbage
    collector: a graph whose nodes save their own outputs (sigmoid does) would otherwise stay
    allocated through the real solve (seen on CUDA: auto's peak one step graph above the
    adjoint's while the collector was frozen)."""
    outputs = []

    def velocity(t, x):
        y = torch.sigmoid(x * (1 + t))  # sigmoid saves its output for backward
        outputs.append(weakref.ref(y))
        return y

    x0 = torch.randn(2, 5, dtype=F64)
    plan = make_plan(solver, 3, 0.0, 1.0, None, x0)
    gc.disable()
    try:
        per_sample = auto.measure_graph_bytes(velocity, plan, x0, ())
        alive = [r for r in outputs if r() is not None]
    finally:
        gc.enable()
    assert per_sample > 0 and outputs and not alive


def test_estimate_fits_the_budget_and_uses_it():
    velocity, shape = make_velocity("conv", F64)
    x0 = torch.randn(2, *shape, dtype=F64, requires_grad=True)
    stored = 2 * x0.numel() * x0.element_size()  # midpoint: x_k and its first-stage velocity
    for budget in (7e4, 1e5, 2e5):
        _, plan = solve_with_plan(velocity, x0, "midpoint", budget)
        split, est = auto.memo(plan).split, auto.memo(plan).estimate
        assert est <= budget and 0 < split.graph < 8
        bigger = Split(split.graph + 1, split.stored - 1)
        costs = Costs(graph=(est - split.stored * stored) / split.graph, stored=stored)
        assert costs.of(bigger) > budget  # one more graph step would not fit


def test_allocate_extremes_and_monotonicity():
    c = Costs(graph=1000.0, stored=10.0)
    assert allocate(8, c, 0, False) == Split(0, 8)
    assert allocate(8, c, 8000, False) == Split(8, 0)
    assert allocate(8, c, 80 + 990 * 3, False) == Split(3, 5)
    prev = -1
    for b in range(0, 9000, 250):
        m = allocate(8, c, b, False).graph
        assert m >= prev
        prev = m
    # reversible solver: the stored states fit only partly -> the rest reversible
    c = Costs(graph=1000.0, stored=10.0, fixed=20.0)
    assert allocate(8, c, 0, True) == Split(0, 0, 8)
    assert allocate(8, c, 50, True) == Split(0, 3, 5)
    assert allocate(8, c, 80, True) == Split(0, 8, 0)
    # a velocity whose graph is smaller than a stored state: keeping the graph is the cheaper way
    assert allocate(8, Costs(graph=1.0, stored=10.0), 0, False) == Split(8, 0)


def test_default_budget(monkeypatch):
    assert auto.default_budget(torch.device("cpu")) == auto.DEFAULT_CPU_BUDGET == 2 * 2 ** 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 * 2 ** 30, 16 * 2 ** 30))
    assert auto.default_budget(torch.device("cuda", 0)) == auto.CUDA_FREE_FRACTION * 8 * 2 ** 30


def test_default_budget_on_cpu_keeps_a_small_solve_whole():
    velocity, shape = make_velocity("conv", F64)
    x0 = torch.randn(2, *shape, dtype=F64, requires_grad=True)
    _, plan = solve_with_plan(velocity, x0, "midpoint", None)
    assert auto.memo(plan).split == Split(8, 0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(gradient="auto", memory_budget=-1), "memory_budget must be a number of bytes >= 0"),
    (dict(gradient="auto", memory_budget=math.nan), "memory_budget"),
    (dict(gradient="auto", memory_budget=True), "memory_budget"),
    (dict(gradient="auto", memory_budget="1GB"), "memory_budget"),
    (dict(gradient="adjoint", memory_budget=1e9), "applies to gradient='auto' only"),
])
def test_bad_memory_budget(kwargs, match):
    calls = []
    v = lambda t, x: calls.append(1) or -x  # noqa: E731
    with pytest.raises(ValueError, match=match):
        df.solve(v, torch.randn(2, 3), steps=2, **kwargs)
    with pytest.raises(ValueError, match=match):
        df.optimize(v, lambda x1: x1.pow(2).sum(1), torch.randn(2, 3), steps=2, **kwargs)
    assert not calls


def test_no_grad_auto_builds_nothing():
    velocity, shape = make_velocity("mlp", F64)
    x0 = torch.randn(3, *shape, dtype=F64)
    with torch.no_grad():
        a = df.solve(velocity, x0, steps=5, gradient="auto")
    b = df.solve(velocity, x0, steps=5, gradient="backprop")
    assert not a.requires_grad and rel_err(a, b.detach()) <= 1e-15


def test_undiscoverable_tensor_raises_under_auto():
    class Holder:
        pass

    h = Holder()
    h.w = torch.randn(3, dtype=F64, requires_grad=True)
    vel = lambda t, x: x * h.w  # noqa: E731
    x0 = torch.randn(2, 3, dtype=F64, requires_grad=True)
    with pytest.raises(RuntimeError, match="gradient='auto'.*params="):
        df.solve(vel, x0, steps=3, gradient="auto", memory_budget=1e9)  # graph: checked at once
    x1 = df.solve(vel, x0, steps=3, gradient="auto", memory_budget=0)
    with pytest.raises(RuntimeError, match="params="):  # adjoint part: checked in the backward
        x1.sum().backward()


# ---- out of memory -------------------------------------------------------------------------------

class OOMOnce:
    """A velocity that raises torch.cuda.OutOfMemoryError at its n-th call made with grad enabled
    (the measuring step and the graph steps run with grad; stored steps do not)."""

    def __init__(self, velocity, n):
        self.velocity, self.n, self.seen, self.raised = velocity, n, 0, False

    def __call__(self, t, x):
        if torch.is_grad_enabled() and not self.raised:
            self.seen += 1
            if self.seen == self.n:
                self.raised = True
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected by the test)")
        return self.velocity(t, x)


@pytest.mark.parametrize("solver", ["midpoint", "reversible_heun"])
def test_forward_oom_retries_with_a_smaller_budget(solver, caplog):
    velocity, shape = make_velocity("conv", F64)
    x0 = torch.randn(2, *shape, dtype=F64, requires_grad=True)
    ref = torch.autograd.grad(
        df.solve(velocity, x0, steps=8, solver=solver, gradient="backprop").pow(2).sum(),
        [x0, *velocity.parameters()])
    u = OOMOnce(velocity, n=6)  # after the measuring step, inside the graph steps
    with caplog.at_level(logging.WARNING, logger="dflow_fast"):
        x1, plan = solve_with_plan(u, x0, solver, 1e12)
    assert u.raised and "out of memory" in caplog.text
    assert 0 < auto.memo(plan).split.graph < 8  # retried with half of the failed split's bytes
    assert auto.memo(plan).budget_cap <= auto.memo(plan).estimate * 1.01 * 2
    g = torch.autograd.grad(x1.pow(2).sum(), [x0, *velocity.parameters()])
    for a, b in zip(g, ref):
        assert rel_err(a, b) <= 1e-10
    # the lowered cap persists for later solves of the same plan (optimize's iterations)
    params = tuple(velocity.parameters())
    run(CheckedVelocity(velocity), plan, x0, "auto", params, True, memory_budget=1e12)
    assert auto.memo(plan).split.graph < 8


class _RaiseInBackwardOnce(torch.autograd.Function):
    armed = True

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        if _RaiseInBackwardOnce.armed:
            _RaiseInBackwardOnce.armed = False
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected in backward)")
        return g


@pytest.mark.parametrize("solver", ["midpoint", "reversible_midpoint"])
def test_backward_oom_recomputes_the_graph_steps_with_the_adjoint(solver, caplog):
    velocity, shape = make_velocity("conv", F64)
    x0 = torch.randn(2, *shape, dtype=F64, requires_grad=True)
    ref = torch.autograd.grad(
        df.solve(velocity, x0, steps=6, solver=solver, gradient="backprop").pow(2).sum(),
        [x0, *velocity.parameters()])

    def v(t, x):
        return velocity(t, _RaiseInBackwardOnce.apply(x))

    _RaiseInBackwardOnce.armed = True
    x1, plan = solve_with_plan(v, x0, solver, 1e12, steps=6)
    assert auto.memo(plan).split == Split(6, 0)
    with caplog.at_level(logging.WARNING, logger="dflow_fast"):
        g = torch.autograd.grad(x1.pow(2).sum(), [x0, *velocity.parameters()])
    assert not _RaiseInBackwardOnce.armed and "recomputing them with the adjoint" in caplog.text
    for a, b in zip(g, ref):
        assert rel_err(a, b) <= 1e-10
    assert auto.memo(plan).budget_cap < auto.memo(plan).estimate


def test_oom_with_nothing_left_to_give_up_is_raised():
    velocity, shape = make_velocity("mlp", F64)
    x0 = torch.randn(2, *shape, dtype=F64, requires_grad=True)

    def always(t, x):
        if torch.is_grad_enabled():
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return velocity(t, x)

    x1 = df.solve(always, x0, steps=3, gradient="auto", memory_budget=1e12)  # no graph kept
    with pytest.raises(torch.cuda.OutOfMemoryError):
        x1.sum().backward()  # the adjoint's one-step recomputation cannot shrink further


# ---- through optimize ----------------------------------------------------------------------------

@pytest.mark.parametrize("solver", ["midpoint", "reversible_heun"])
@pytest.mark.parametrize("budget", [0, 3_000, None])
def test_optimize_with_auto_follows_backprop(solver, budget):
    velocity, shape = make_velocity("mlp", F64)
    velocity.requires_grad_(False)
    g = torch.Generator().manual_seed(3)
    y = torch.randn(4, *shape, generator=g, dtype=F64)
    x0 = torch.randn(4, *shape, generator=g, dtype=F64)
    cost = lambda x1: ((x1 - y) ** 2).sum(1)  # noqa: E731
    kw = dict(steps=5, solver=solver, max_iter=6)
    a = df.optimize(velocity, cost, x0, gradient="auto", memory_budget=budget, **kw)
    b = df.optimize(velocity, cost, x0, gradient="backprop", **kw)
    assert rel_err(a.x0, b.x0) <= 1e-9 and a.status == b.status
    assert a.extra["gradient"] == "auto"
