"""solve(): the exact discrete adjoint against autograd, against the plain reference loop and
against closed forms; the memory it saves for backward."""
from __future__ import annotations

import pytest
import torch

import dflow_fast as df
from dflow_fast import reference

from tests.helpers import make_velocity, rel_err

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
GRIDS = {
    "uniform": dict(steps=5),
    "one-step": dict(steps=1, t0=0.1, t1=0.9),
    "many": dict(steps=12),
    "nonuniform": dict(time_grid=[0.0, 0.05, 0.2, 0.5, 0.55, 0.9, 1.0]),
    "backward": dict(t0=1.0, t1=0.0, steps=4),
    "partial": dict(t0=0.2, t1=0.7, steps=3),
}


def grads_of(velocity, x0, W, gradient, solver, grid):
    """Gradients of a scalar loss of x1 w.r.t. x0, a closed-over tensor W and module params."""
    x0 = x0.clone().requires_grad_(True)

    def v(t, x):  # closes over W: its gradient must be found by the adjoint too
        return velocity(t, x) + 0.3 * torch.tanh(W) * x

    x1 = df.solve(v, x0, solver=solver, gradient=gradient, **grid)
    target = torch.linspace(-1, 1, x1.numel(), dtype=x1.dtype).reshape(x1.shape)
    loss = ((x1 - target) ** 2).sum() + x1.sin().sum()
    params = [x0, W, *velocity.parameters()]
    return x1.detach(), torch.autograd.grad(loss, params)


@pytest.mark.parametrize("grid", list(GRIDS), ids=list(GRIDS))
@pytest.mark.parametrize("solver", ["euler", "midpoint"])
@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_adjoint_equals_backprop(kind, solver, grid, dtype):
    velocity, shape = make_velocity(kind, dtype)
    x0 = torch.randn(3, *shape, dtype=dtype)
    W = torch.randn(shape, dtype=dtype, requires_grad=True)
    x1_b, g_b = grads_of(velocity, x0, W, "backprop", solver, GRIDS[grid])
    x1_a, g_a = grads_of(velocity, x0, W, "adjoint", solver, GRIDS[grid])
    assert rel_err(x1_a, x1_b) <= TOL[dtype]
    assert len(g_a) == len(g_b) == 2 + len(list(velocity.parameters()))
    for ga, gb in zip(g_a, g_b):
        assert torch.isfinite(ga).all()
        assert gb.norm() > 0
        assert rel_err(ga, gb) <= TOL[dtype]


@pytest.mark.parametrize("solver", ["euler", "midpoint"])
def test_backprop_equals_reference_loop(solver):
    velocity, shape = make_velocity("conv", torch.float64)
    x0 = torch.randn(2, *shape, dtype=torch.float64, requires_grad=True)
    grid = [0.0, 0.1, 0.4, 1.0]
    outs = []
    for fn in (df.solve, reference.solve):
        x1 = fn(velocity, x0, solver=solver, time_grid=grid)
        outs.append((x1, torch.autograd.grad(x1.pow(2).sum(), x0)[0]))
    assert rel_err(outs[0][0], outs[1][0]) <= 1e-13
    assert rel_err(outs[0][1], outs[1][1]) <= 1e-12


def gaussian_fm_velocity(mu, sigma):
    """The exact flow-matching velocity of data N(mu, diag(sigma^2)) under the linear path
    x_t = (1 - t) x0 + t x1: affine in x, u(t, x) = a(t) (x - t mu) + mu with
    a(t) = (t sigma^2 - (1 - t)) / (t^2 sigma^2 + (1 - t)^2)."""
    def a(t):
        return (t * sigma**2 - (1 - t)) / (t**2 * sigma**2 + (1 - t) ** 2)

    def velocity(t, x):
        return a(t) * (x - t * mu) + mu
    return velocity, a


def closed_form(a, mu, grid, solver):
    """x1 = M x0 + C mu (diagonal M, C) for the affine velocity: product of per-step maps."""
    M = torch.ones_like(mu)
    C = torch.zeros_like(mu)
    for ta, tb in zip(grid[:-1], grid[1:]):
        h = tb - ta
        if solver == "euler":
            Mk, Ck = 1 + h * a(ta), h * (1 - a(ta) * ta)
        else:
            tm = ta + h / 2
            Mk = 1 + h * a(tm) * (1 + h / 2 * a(ta))
            Ck = h * a(tm) * h / 2 * (1 - a(ta) * ta) + h * (1 - a(tm) * tm)
        M, C = Mk * M, Mk * C + Ck
    return M, C


@pytest.mark.parametrize("solver", ["euler", "midpoint"])
@pytest.mark.parametrize("grid", [[0.0, 0.25, 0.5, 0.75, 1.0], [0.0, 0.1, 0.15, 0.6, 0.95],
                                  [0.9, 0.6, 0.3, 0.05]], ids=["uniform", "nonuniform", "back"])
@pytest.mark.parametrize("gradient", ["adjoint", "backprop"])
def test_affine_flow_matches_closed_form(solver, grid, gradient):
    d = 7
    mu = torch.randn(d, dtype=torch.float64, requires_grad=True)
    sigma = torch.rand(d, dtype=torch.float64) * 1.5 + 0.5
    velocity, a = gaussian_fm_velocity(mu, sigma)
    x0 = torch.randn(4, d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, d, dtype=torch.float64)
    x1 = df.solve(velocity, x0, time_grid=grid, solver=solver, gradient=gradient)
    gx0, gmu = torch.autograd.grad((w * x1).sum(), [x0, mu])
    with torch.no_grad():
        M, C = closed_form(lambda t: a(torch.tensor(t, dtype=torch.float64)), mu, grid, solver)
        assert rel_err(x1, M * x0 + C * mu) <= 1e-13
        assert rel_err(gx0, M * w) <= 1e-13
        assert rel_err(gmu, C * w.sum(0)) <= 1e-13


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward while fn() runs."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


@pytest.mark.parametrize("solver", ["euler", "midpoint"])
def test_adjoint_saves_a_fixed_number_of_states_per_step(solver):
    """Euler stores x_k; midpoint also its first-stage velocity (so that its backward holds one
    evaluation's graph at a time)."""
    velocity, shape = make_velocity("conv", torch.float32)
    x0 = torch.randn(4, *shape, requires_grad=True)

    def run(gradient, steps):
        return saved_bytes(lambda: df.solve(velocity, x0, steps=steps, solver=solver,
                                            gradient=gradient))

    state = x0.numel() * x0.element_size()
    adj8, adj16 = run("adjoint", 8), run("adjoint", 16)
    bp8, bp16 = run("backprop", 8), run("backprop", 16)
    per = 2 if solver == "midpoint" else 1
    assert adj8 == 8 * per * state and adj16 == 16 * per * state
    # backprop keeps every evaluation's activations: many states' worth per step (the conv net
    # is 4x wider than the state and saves several tensors per layer)
    per_step = (bp16 - bp8) / 8
    assert per_step >= 8 * state
    assert bp8 > 4 * adj8


def test_adjoint_backward_holds_one_evaluation_of_activations():
    """During the backward sweep the live saved activations never exceed one evaluation's graph:
    each recomputed evaluation is freed before the next, whatever the number of steps."""
    velocity, shape = make_velocity("conv", torch.float32)
    x0 = torch.randn(2, *shape, requires_grad=True)
    live, peak = [0], [0]

    class Held:  # counts bytes while autograd keeps the saved tensor alive
        def __init__(self, t):
            self.t, self.n = t, t.numel() * t.element_size()
            live[0] += self.n
            peak[0] = max(peak[0], live[0])

        def __del__(self):
            live[0] -= self.n

    x1 = df.solve(velocity, x0, steps=10, gradient="adjoint")
    with torch.autograd.graph.saved_tensors_hooks(Held, lambda h: h.t):
        x1.sum().backward()
    one_step = saved_bytes(lambda: df.solve(velocity, x0, steps=1, gradient="backprop"))
    ten_steps = saved_bytes(lambda: df.solve(velocity, x0, steps=10, gradient="backprop"))
    assert ten_steps >= 9 * one_step
    # midpoint: the two evaluations' graphs are pulled back one after the other, never both held
    # (one step's graph is both of them)
    assert 0 < peak[0] <= 0.6 * one_step


def test_gradient_reaches_parameters_of_wrapped_model():
    class XT(torch.nn.Module):  # a model called as model(x, t) with t of shape [B]
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, x, t):
            assert t.shape == (x.shape[0],)
            return self.lin(torch.cat([x, t[:, None]], 1))

    model = XT().double()
    vel = df.ModelVelocity(model)
    x0 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    out = {}
    for g in ("adjoint", "backprop"):
        x1 = df.solve(vel, x0, steps=3, gradient=g)
        out[g] = torch.autograd.grad(x1.pow(2).sum(), [x0, *model.parameters()])
    for a, b in zip(out["adjoint"], out["backprop"]):
        assert rel_err(a, b) <= 1e-12


def test_global_module_and_partial_are_discovered():
    import functools
    global _GLOBAL_NET
    _GLOBAL_NET = torch.nn.Linear(3, 3).double()

    def vel(t, x, scale):
        return _GLOBAL_NET(x) * scale

    s = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    v = functools.partial(vel, scale=s)
    x0 = torch.randn(2, 3, dtype=torch.float64)
    out = {}
    for g in ("adjoint", "backprop"):
        x1 = df.solve(v, x0, steps=4, gradient=g)
        out[g] = torch.autograd.grad(x1.pow(2).sum(), [s, _GLOBAL_NET.weight])
    for a, b in zip(out["adjoint"], out["backprop"]):
        assert rel_err(a, b) <= 1e-12


def test_undiscoverable_tensor_raises_instead_of_dropping_its_gradient():
    class Holder:
        pass

    h = Holder()
    h.w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    vel = lambda t, x: x * h.w  # noqa: E731  (reached through an attribute: not discoverable)
    x0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    x1 = df.solve(vel, x0, steps=2, gradient="adjoint")  # the default "auto": tests/gradients
    with pytest.raises(RuntimeError, match="params="):
        x1.sum().backward()
    x1 = df.solve(vel, x0, steps=2, params=[h.w])  # listed explicitly: fine, and exact
    gw = torch.autograd.grad(x1.sum(), h.w)[0]
    gw_ref = torch.autograd.grad(df.solve(vel, x0, steps=2, gradient="backprop").sum(), h.w)[0]
    assert rel_err(gw, gw_ref) <= 1e-12


def test_no_grad_solve_stores_nothing_and_matches():
    velocity, shape = make_velocity("mlp", torch.float64)
    x0 = torch.randn(3, *shape, dtype=torch.float64)
    with torch.no_grad():
        a = df.solve(velocity, x0, steps=5)
    b = df.solve(velocity, x0, steps=5, gradient="backprop")
    assert not a.requires_grad
    assert rel_err(a, b.detach()) <= 1e-14


def test_t_is_a_scalar_tensor_on_x_dtype():
    seen = []

    def vel(t, x):
        seen.append((t.dim(), t.dtype, float(t)))
        return -x

    df.solve(vel, torch.randn(2, 3, dtype=torch.float64), time_grid=[0.0, 0.5, 1.0],
             solver="midpoint")
    assert [s[:2] for s in seen] == [(0, torch.float64)] * 4
    assert [s[2] for s in seen] == [0.0, 0.25, 0.5, 0.75]


def test_explicit_empty_params_skips_weight_gradients():
    """params=[] asks for x0's gradient only: the backward sweep differentiates no weights."""
    velocity, shape = make_velocity("conv", torch.float64)  # weights require grad
    x0 = torch.randn(2, *shape, dtype=torch.float64, requires_grad=True)
    x1 = df.solve(velocity, x0, steps=3, params=[])
    x1.pow(2).sum().backward()
    assert all(p.grad is None for p in velocity.parameters())
    g_ref = torch.autograd.grad(df.solve(velocity, x0, steps=3, gradient="backprop").pow(2).sum(),
                                x0)[0]
    assert rel_err(x0.grad, g_ref) <= 1e-12
