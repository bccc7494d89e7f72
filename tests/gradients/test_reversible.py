"""Reversible solvers (reversible Heun; coupled reversible RK around Euler and midpoint): the
O(1)-memory gradient="reversible" against autograd through the same solver, the memory it saves,
the reconstruction drift and its warning, the fused ops and their backend fallback."""
from __future__ import annotations

import functools
import math
import warnings

import pytest
import torch

import dflow_fast as df
from dflow_fast.ops import twins as ref
from dflow_fast.ops import registry as backends
from dflow_fast.gradients.reversible import ReconstructionWarning, drift_tolerance, reconstruction_drift
from dflow_fast.core.plan import DEFAULT_COUPLING, REVERSIBLE

from tests.helpers import make_velocity, rel_err
from tests.test_solve import saved_bytes

F64 = torch.float64
GRIDS = {
    "uniform": dict(steps=5),
    "one-step": dict(steps=1, t0=0.1, t1=0.9),
    "many": dict(steps=12),
    "nonuniform": dict(time_grid=[0.0, 0.05, 0.2, 0.5, 0.55, 0.9, 1.0]),
    "backward": dict(t0=1.0, t1=0.0, steps=4),
    "partial": dict(t0=0.2, t1=0.7, steps=3),
}
#: (solver, coupling) cases: Heun has no coupling; the coupled solvers at the default and at 0.5
CASES = [("reversible_heun", None), ("reversible_euler", None), ("reversible_euler", 0.5),
         ("reversible_midpoint", None), ("reversible_midpoint", 0.5)]
CASE_IDS = [s.removeprefix("reversible_") + ("" if c is None else f"-lam{c}") for s, c in CASES]


def grads_of(velocity, x0, W, gradient, solver, coupling, grid, **kw):
    """x1 and the gradients of a scalar loss of it w.r.t. x0, a closed-over W and the weights."""
    x0 = x0.clone().requires_grad_(True)

    def v(t, x):  # closes over W: the reversible backward must find it too
        return velocity(t, x) + 0.3 * torch.tanh(W) * x

    x1 = df.solve(v, x0, solver=solver, gradient=gradient, coupling=coupling, **grid, **kw)
    target = torch.linspace(-1, 1, x1.numel(), dtype=x1.dtype).reshape(x1.shape)
    loss = ((x1 - target) ** 2).sum() + x1.sin().sum()
    return x1.detach(), torch.autograd.grad(loss, [x0, W, *velocity.parameters()])


@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("solver, coupling", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_reversible_and_adjoint_equal_backprop(kind, solver, coupling, grid):
    velocity, shape = make_velocity(kind, F64)
    x0 = torch.randn(3, *shape, dtype=F64)
    W = torch.randn(shape, dtype=F64, requires_grad=True)
    x1_b, g_b = grads_of(velocity, x0, W, "backprop", solver, coupling, GRIDS[grid])
    for gradient in ("reversible", "adjoint"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", ReconstructionWarning)  # float64: no drift to speak of
            x1, g = grads_of(velocity, x0, W, gradient, solver, coupling, GRIDS[grid])
        assert rel_err(x1, x1_b) <= 1e-12
        assert len(g) == len(g_b) == 2 + len(list(velocity.parameters()))
        for a, b in zip(g, g_b):
            assert b.norm() > 0
            assert rel_err(a, b) <= 1e-9, gradient


@pytest.mark.parametrize("solver", REVERSIBLE)
def test_solvers_converge_at_their_order(solver):
    """The schemes are what they claim: on a nonlinear time-dependent ODE, halving h divides the
    error by 4 (Heun, coupled midpoint) or 2 (coupled Euler). The order does not depend on the
    coupling; at lambda = 0.999 coupled Euler is already asymptotic at 32 steps (at 0.95 its
    smaller error still mixes terms of both signs there)."""
    v = lambda t, x: torch.cos(3 * t) * x - 0.25 * x ** 3  # noqa: E731
    x0 = torch.randn(4, 5, dtype=F64)
    truth = df.solve(v, x0, steps=4000, solver="midpoint")
    lam = None if solver == "reversible_heun" else 0.999
    e1, e2 = (rel_err(df.solve(v, x0, steps=n, solver=solver, coupling=lam), truth)
              for n in (32, 64))
    order = math.log2(e1 / e2)
    want = 1 if solver == "reversible_euler" else 2
    assert abs(order - want) < 0.15


def test_affine_reversible_heun_matches_closed_form():
    """On dx/dt = a x (a constant), reversible Heun's step is linear in (y, yhat): check x1 against
    the product of the 2x2 step matrices."""
    a, n, h = -0.7, 6, 1 / 6
    x0 = torch.randn(3, 4, dtype=F64, requires_grad=True)
    x1 = df.solve(lambda t, x: a * x, x0, steps=n, solver="reversible_heun", gradient="reversible")
    # state (y, yhat), f = a yhat: yhat' = 2y - yhat + h a yhat; y' = y + h/2 a (yhat + yhat')
    M = torch.eye(2, dtype=F64)
    step = torch.tensor([[2.0, -1 + h * a]], dtype=F64)  # yhat' row
    for _ in range(n):
        yh_row = step
        y_row = torch.tensor([[1.0, 0.0]], dtype=F64) + 0.5 * h * a * (
            torch.tensor([[0.0, 1.0]], dtype=F64) + yh_row)
        M = torch.cat([y_row, yh_row]) @ M
    coef = float(M[0].sum())  # y_0 = yhat_0 = x0
    assert rel_err(x1, coef * x0) <= 1e-14
    g = torch.autograd.grad(x1.sum(), x0)[0]
    assert rel_err(g, torch.full_like(x0, coef)) <= 1e-14


def test_parameters_partials_and_explicit_params():
    global _GLOBAL_NET
    _GLOBAL_NET = torch.nn.Linear(3, 3).double()

    def vel(t, x, scale):
        return torch.tanh(_GLOBAL_NET(x)) * scale

    s = torch.tensor(0.7, dtype=F64, requires_grad=True)
    v = functools.partial(vel, scale=s)
    x0 = torch.randn(2, 3, dtype=F64)
    out = {}
    for g in ("reversible", "backprop"):
        x1 = df.solve(v, x0, steps=4, solver="reversible_midpoint", gradient=g)
        out[g] = torch.autograd.grad(x1.pow(2).sum(), [s, _GLOBAL_NET.weight])
    for a, b in zip(out["reversible"], out["backprop"]):
        assert rel_err(a, b) <= 1e-10


@pytest.mark.parametrize("solver", REVERSIBLE)
def test_undiscoverable_tensor_raises_instead_of_dropping_its_gradient(solver):
    class Holder:
        pass

    h = Holder()
    h.w = torch.randn(3, dtype=F64, requires_grad=True)
    vel = lambda t, x: x * h.w  # noqa: E731  (reached through an attribute: not discoverable)
    x0 = torch.randn(2, 3, dtype=F64, requires_grad=True)
    x1 = df.solve(vel, x0, steps=2, solver=solver, gradient="reversible")
    with pytest.raises(RuntimeError, match="gradient='reversible'.*params="):
        x1.sum().backward()
    x1 = df.solve(vel, x0, steps=2, solver=solver, gradient="reversible", params=[h.w])
    gw = torch.autograd.grad(x1.sum(), h.w)[0]
    x1 = df.solve(vel, x0, steps=2, solver=solver, gradient="backprop")
    assert rel_err(gw, torch.autograd.grad(x1.sum(), h.w)[0]) <= 1e-12


@pytest.mark.parametrize("solver", ["euler", "midpoint"])
def test_plain_solver_with_reversible_gradient_is_refused(solver):
    calls = []
    with pytest.raises(ValueError, match="reversible_heun.*reversible_euler.*reversible_midpoint"):
        df.solve(lambda t, x: calls.append(1) or -x, torch.randn(2, 3), steps=2, solver=solver,
                 gradient="reversible")
    with pytest.raises(ValueError, match="gradient='reversible' needs a reversible solver"):
        df.optimize(lambda t, x: calls.append(1) or -x, lambda x1: x1.pow(2).sum(1),
                    torch.randn(2, 3), steps=2, solver=solver, gradient="reversible")
    assert not calls


@pytest.mark.parametrize("solver, coupling, match", [
    ("reversible_euler", 0.0, r"coupling must be a number in \(0, 1\)"),
    ("reversible_euler", 1.0, r"\(0, 1\)"),
    ("reversible_midpoint", -0.5, r"\(0, 1\)"),
    ("reversible_midpoint", True, r"\(0, 1\)"),
    ("reversible_midpoint", math.nan, r"\(0, 1\)"),
    ("reversible_heun", 0.5, "applies only to the coupled reversible solvers"),
    ("midpoint", 0.5, "applies only"),
])
def test_bad_coupling(solver, coupling, match):
    with pytest.raises(ValueError, match=match):
        df.solve(lambda t, x: -x, torch.randn(2, 3), steps=2, solver=solver, coupling=coupling)


def test_coupling_changes_the_coupled_solution_and_defaults_to_documented_value():
    from dflow_fast.core.plan import DEFAULT_COUPLING
    velocity, shape = make_velocity("mlp", F64)
    x0 = torch.randn(2, *shape, dtype=F64)
    with torch.no_grad():
        a = df.solve(velocity, x0, steps=4, solver="reversible_euler")
        b = df.solve(velocity, x0, steps=4, solver="reversible_euler", coupling=DEFAULT_COUPLING)
        c = df.solve(velocity, x0, steps=4, solver="reversible_euler", coupling=0.5)
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("solver", REVERSIBLE)
def test_evaluation_counts(solver):
    """Forward: N+1 (Heun), 2N, 4N evaluations; the reversible backward evaluates each point once
    more with grad, rebuilding from those same evaluations (no extra ones)."""
    velocity, shape = make_velocity("mlp", F64)
    calls = [0]

    def v(t, x):
        calls[0] += 1
        return velocity(t, x)

    x0 = torch.randn(2, *shape, dtype=F64, requires_grad=True)
    n = 5
    x1 = df.solve(v, x0, steps=n, solver=solver, gradient="reversible")
    per = {"reversible_heun": n + 1, "reversible_euler": 2 * n, "reversible_midpoint": 4 * n}
    assert calls[0] == per[solver]
    x1.sum().backward()
    assert calls[0] == 2 * per[solver]


@pytest.mark.parametrize("solver", REVERSIBLE)
def test_saved_bytes_do_not_grow_with_steps(solver):
    velocity, shape = make_velocity("conv", torch.float32)
    x0 = torch.randn(4, *shape, requires_grad=True)

    def run(gradient, steps):
        return saved_bytes(lambda: df.solve(velocity, x0, steps=steps, solver=solver,
                                            gradient=gradient))

    state = x0.numel() * x0.element_size()
    rev8, rev64 = run("reversible", 8), run("reversible", 64)
    assert rev8 == rev64 == 4 * state  # final pair + references to the input pair (x0 twice)
    per_step = 1 if solver == "reversible_heun" else 2  # the stored adjoint's points
    adj8, adj16 = run("adjoint", 8), run("adjoint", 16)
    assert adj16 - adj8 == 8 * per_step * state
    assert run("backprop", 8) > 10 * rev8


def test_reversible_backward_holds_one_evaluation_of_activations():
    """During the reversible backward the live saved activations never exceed one evaluation's
    graph (one base step for the coupled solver), whatever the number of steps."""
    velocity, shape = make_velocity("conv", torch.float32)
    x0 = torch.randn(2, *shape, requires_grad=True)
    live, peak = [0], [0]

    class Held:
        def __init__(self, t):
            self.t, self.n = t, t.numel() * t.element_size()
            live[0] += self.n
            peak[0] = max(peak[0], live[0])

        def __del__(self):
            live[0] -= self.n

    x1 = df.solve(velocity, x0, steps=12, solver="reversible_heun", gradient="reversible")
    with torch.autograd.graph.saved_tensors_hooks(Held, lambda h: h.t):
        x1.sum().backward()
    one_eval = saved_bytes(lambda: velocity(torch.tensor(0.5), x0))
    assert 0 < peak[0] <= one_eval


# ---- reconstruction drift ------------------------------------------------------------------------

@pytest.mark.parametrize("solver, coupling", CASES, ids=CASE_IDS)
def test_float64_reconstruction_is_exact_to_rounding(solver, coupling):
    """Rounding amplified by at most 1/lam per step of the inverse (Heun: no amplification)."""
    velocity, shape = make_velocity("conv", F64)
    x0 = torch.randn(3, *shape, dtype=F64)
    n = 16
    d = reconstruction_drift(velocity, x0, solver=solver, coupling=coupling, steps=n)
    assert d.shape == (3,) and d.dtype == F64
    lam = 1.0 if solver == "reversible_heun" else (coupling or DEFAULT_COUPLING)
    assert float(d.max()) <= 10 * n * torch.finfo(F64).eps * lam ** -n


@pytest.mark.parametrize("steps", [4, 16, 64])
@pytest.mark.parametrize("solver, coupling", [("reversible_heun", None),
                                              ("reversible_euler", 0.9),
                                              ("reversible_midpoint", 0.9),
                                              ("reversible_midpoint", 0.999)],
                         ids=["heun", "euler-lam0.9", "midpoint-lam0.9", "midpoint-lam0.999"])
def test_float32_drift_across_steps_and_coupling(solver, coupling, steps):
    """float32 drift stays within the rounding amplification bound eps * N * lam^-N (times a
    modest constant), and under the warning tolerance for these settings."""
    velocity, shape = make_velocity("conv", torch.float32)
    x0 = torch.randn(4, *shape)
    d = float(reconstruction_drift(velocity, x0, solver=solver, coupling=coupling,
                                   steps=steps).max())
    lam = 1.0 if coupling is None else coupling
    assert d <= 20 * steps * torch.finfo(torch.float32).eps * lam ** -steps
    assert d <= drift_tolerance(torch.float32)


@pytest.mark.parametrize("solver", REVERSIBLE)
def test_float32_drift_is_small_and_silent_in_a_normal_case(solver):
    velocity, shape = make_velocity("conv", torch.float32)
    x0 = torch.randn(3, *shape, requires_grad=True)
    d = reconstruction_drift(velocity, x0, solver=solver, steps=16)
    assert float(d.max()) <= 1e-4 < drift_tolerance(torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReconstructionWarning)
        x1 = df.solve(velocity, x0, steps=16, solver=solver, gradient="reversible")
        x1.pow(2).sum().backward()


def test_drift_warning_fires_in_a_contrived_bad_case():
    """A small coupling amplifies rounding by up to 1/lam per step of the inverse: lam = 0.2 over 12
    steps in float32 (5^12 ~ 2e8 times eps) loses every digit. The backward warns."""
    velocity, shape = make_velocity("conv", torch.float32)
    x0 = torch.randn(2, *shape, requires_grad=True)
    kw = dict(solver="reversible_euler", coupling=0.2, steps=12)
    assert float(reconstruction_drift(velocity, x0.detach(), **kw).max()) > 1.0
    x1 = df.solve(velocity, x0, gradient="reversible", **kw)
    with pytest.warns(ReconstructionWarning, match=r"relative drift .* > tolerance 0\.000345"):
        x1.pow(2).sum().backward()
    x1 = df.solve(velocity, x0, gradient="adjoint", **kw)  # the stored adjoint is the remedy
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReconstructionWarning)
        x1.pow(2).sum().backward()


def test_drift_tolerance_is_sqrt_eps_and_overridable(monkeypatch):
    from dflow_fast.gradients import reversible
    eps32 = torch.finfo(torch.float32).eps
    assert drift_tolerance(torch.float32) == pytest.approx(math.sqrt(eps32))
    monkeypatch.setitem(reversible.DRIFT_TOLERANCE, torch.float64, 0.0)
    velocity, shape = make_velocity("mlp", F64)
    x0 = torch.randn(2, *shape, dtype=F64, requires_grad=True)
    x1 = df.solve(velocity, x0, steps=6, solver="reversible_euler", coupling=0.3,
                  gradient="reversible")
    with pytest.warns(ReconstructionWarning):  # any nonzero drift now exceeds the tolerance
        x1.sum().backward()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 drift is measured on CUDA")
@pytest.mark.parametrize("solver", REVERSIBLE)
def test_bf16_drift_on_cuda_is_measured_against_its_own_tolerance(solver):
    velocity, shape = make_velocity("conv", torch.float32)
    velocity = velocity.cuda().bfloat16()
    x0 = torch.randn(4, *shape, device="cuda").bfloat16()
    d = reconstruction_drift(velocity, x0, solver=solver, steps=8)
    assert torch.isfinite(d).all()
    assert float(d.max()) <= drift_tolerance(torch.bfloat16)


# ---- fused ops and their fallback ----------------------------------------------------------------

def test_ops_invert_each_other():
    """One step forward, then the same ops with negated steps, give back the start exactly (to
    rounding): the inverse sweep's contract. fn stands for u(t', yhat')."""
    g = torch.Generator().manual_seed(0)
    y, yh, f, fn, z, v = (torch.randn(5, 7, generator=g, dtype=F64) for _ in range(6))
    h, lam = 0.3, 0.7
    yh1 = ref.heun_predict(y, yh, f, h)
    y1, _ = ref.heun_step(y, yh1, f, fn, h, 0.0)
    assert rel_err(ref.heun_predict(y1, yh1, fn, -h), yh) <= 1e-15  # yhat = 2y' - yhat' - h f'
    assert rel_err(ref.heun_step(y1, yh, fn, f, -h, 0.0)[0], y) <= 1e-15
    y1 = ref.coupled_forward(y, z, v, lam, h)
    assert rel_err(ref.coupled_inverse(y1, z, v, lam, h), y) <= 1e-15


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_low_precision_twins_accumulate_in_fp32(dtype):
    g = torch.Generator().manual_seed(1)
    a, b, c, d = (torch.randn(64, generator=g, dtype=F64) for _ in range(4))
    lo = [t.to(dtype) for t in (a, b, c, d)]
    out = ref.heun_step(lo[0], lo[1], lo[2], lo[3], 0.1, 0.2)
    want = ref.heun_step(*[t.double() for t in lo], 0.1, 0.2)
    assert all(o.dtype == dtype for o in out)
    eps = torch.finfo(dtype).eps
    for o, w in zip(out, want):
        assert rel_err(o, w) <= 2 * eps  # one rounding at the end, not one per term
    o = ref.coupled_adjoint(lo[0], lo[1], lo[2], 0.9, 0.1)
    w = ref.coupled_adjoint(*[t.double() for t in lo[:3]], 0.9, 0.1)
    assert all(rel_err(x, y) <= 2 * eps for x, y in zip(o, w))


@pytest.mark.parametrize("name", [b for b in backends.BACKENDS if b != "torch"])
def test_compiled_backends_have_kernels_for_every_reversible_op(name):
    try:
        ops = backends.load(name)
    except (backends.BackendUnavailable, ValueError) as e:
        pytest.skip(f"backend {name!r} not available here: {e}")
    assert ops.fallbacks == ()
    for op in backends.REVERSIBLE_OP_NAMES:
        assert getattr(ops, op) is not getattr(ref, op), op
    assert backends.load("torch").fallbacks == ()


def test_backend_without_a_reversible_kernel_falls_back_to_the_twin(caplog):
    """A namespace that lacks some of the reversible ops (a new backend, or an extension built
    from older sources) runs the twins for exactly those, says so, and lists them."""
    import types

    def mine(*args):
        raise AssertionError("not called")

    core = {op: getattr(ref, op) for op in backends.OP_NAMES}
    ns = types.SimpleNamespace(**core, heun_predict=mine, coupled_adjoint=mine)
    with caplog.at_level("DEBUG", logger="dflow_fast"):
        ops = backends._from_namespace("partial", ns)
    missing = ("heun_step", "heun_adjoint", "coupled_forward", "coupled_inverse")
    assert ops.fallbacks == missing
    assert ops.heun_predict is mine and ops.coupled_adjoint is mine
    for op in missing:
        assert getattr(ops, op) is getattr(ref, op)
    assert "backend 'partial' has no kernels for heun_step, heun_adjoint" in caplog.text
    with pytest.raises(AttributeError):  # the five core ops stay required
        backends._from_namespace("broken", types.SimpleNamespace(axpy=ref.axpy))


# ---- through optimize and without grad -----------------------------------------------------------

def test_no_grad_reversible_solve_stores_nothing_and_matches():
    velocity, shape = make_velocity("mlp", F64)
    x0 = torch.randn(3, *shape, dtype=F64)
    with torch.no_grad():
        a = df.solve(velocity, x0, steps=5, solver="reversible_heun", gradient="reversible")
    b = df.solve(velocity, x0, steps=5, solver="reversible_heun", gradient="backprop")
    assert not a.requires_grad and rel_err(a, b.detach()) <= 1e-15
    assert saved_bytes(lambda: df.solve(velocity, x0, steps=5, solver="reversible_heun",
                                        gradient="reversible", params=[])) == 0


@pytest.mark.parametrize("solver", ["reversible_heun", "reversible_midpoint"])
def test_optimize_with_reversible_gradient_follows_backprop(solver):
    velocity, shape = make_velocity("mlp", F64)
    velocity.requires_grad_(False)
    g = torch.Generator().manual_seed(3)
    y = torch.randn(3, *shape, generator=g, dtype=F64)
    x0 = torch.randn(3, *shape, generator=g, dtype=F64)
    cost = lambda x1: ((x1 - y) ** 2).sum(1)  # noqa: E731
    kw = dict(steps=4, solver=solver, max_iter=6, coupling=0.9 if solver != "reversible_heun"
              else None)
    a = df.optimize(velocity, cost, x0, gradient="reversible", **kw)
    b = df.optimize(velocity, cost, x0, gradient="backprop", **kw)
    assert rel_err(a.x0, b.x0) <= 1e-9 and a.status == b.status
    assert a.extra["solver"] == solver and a.loss.mean() < cost(x0).mean()
