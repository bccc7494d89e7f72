"""flow_matching models through :func:`dflow_fast.adapters.from_flow_matching`: the same solve as
flow_matching's own ``ODESolver`` step for step, epsilon / x1 predictions converted as
flow_matching converts them and as the closed-form Gaussian case demands, ``extras`` as per-sample
``cond`` under ``optimize``, and bad input refused before any evaluation.

Tolerances (float64, eps = 2.2e-16): the parity tests compare two implementations of the same
arithmetic whose only differences are the rounding of the time points (ours k/N and
(t_k + t_{k+1})/2 in float64 on the host, torchdiffeq's k * (1/N) and t_k + h/2 in tensors) and
of the conversion coefficients (ours formed in float64 on the host, flow_matching's in tensors).
Each differs by about one ulp per operation, and a tanh-MLP velocity with Lipschitz constant
L ~ 1 over N = 8 steps amplifies it by at most (1 + L h)^N ~ e: the expected error is a few
1e-16 (measured: at most 9e-16, for N up to 100); the bound 1e-13 leaves two orders of margin
and still fails on any real difference (an extra step, a wrong stage time: >= 1e-3). Conversions
are compared relative to their terms |a x| + |b pred|, which cancel near alpha_t = 0 / sigma_t = 0.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("flow_matching", reason="the [flow_matching] extra is not installed")
from flow_matching.path import AffineProbPath, CondOTProbPath, MixtureDiscreteProbPath  # noqa: E402
from flow_matching.path.scheduler import (CondOTScheduler, CosineScheduler,  # noqa: E402
                                          PolynomialConvexScheduler, VPScheduler)
from flow_matching.solver import ODESolver  # noqa: E402
from flow_matching.utils import ModelWrapper  # noqa: E402

import dflow_fast as df  # noqa: E402
from dflow_fast.adapters import flow_matching as fm_adapter  # noqa: E402
from dflow_fast.adapters import from_flow_matching  # noqa: E402

F64 = torch.float64
TOL = 1e-13
SCHEDULERS = {"condot": CondOTScheduler, "poly2": lambda: PolynomialConvexScheduler(2),
              "cosine": CosineScheduler, "vp": VPScheduler}


class Net(ModelWrapper):
    """A flow_matching model: ``forward(x, t, label=None, gain=1.0)``, t 0-dim (ODESolver) or [B];
    records every call's (t, x) when ``record`` is a list."""

    def __init__(self, dim: int = 3, hidden: int = 16, classes: int = 4):
        super().__init__(None)
        self.emb = nn.Embedding(classes, 4)
        self.net = nn.Sequential(nn.Linear(dim + 5, hidden), nn.Tanh(), nn.Linear(hidden, dim))
        self.record = None

    def forward(self, x, t, label=None, gain=1.0, **extras):
        if self.record is not None:
            self.record.append((t.detach().clone(), x.detach().clone()))
        if label is None:
            label = torch.zeros(x.shape[0], dtype=torch.long)
        tt = t.reshape(-1, 1).expand(x.shape[0], 1).to(x.dtype)
        return gain * self.net(torch.cat([x, tt, self.emb(label)], 1))


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().double().requires_grad_(False)


def _max_err(a, b) -> float:
    return float((a - b).abs().max())


def _terms(u, t, x, pred) -> float:
    """max |a x| + max |b pred| of the conversion u = a x + b pred at 0-dim t: its rounding error
    is relative to these terms, not to u (near alpha_t = 0 or sigma_t = 0 they cancel)."""
    a, b = u.coefficients(float(t))
    return abs(a) * float(x.abs().max()) + abs(b) * float(pred.abs().max())


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_midpoint_equals_flow_matching_ode_solver_step_for_step(direction):
    """``ODESolver(velocity_model=m).sample(method="midpoint", step_size=1/N, time_grid=...)``
    runs torchdiffeq's fixed-grid midpoint; ours evaluates the model at the same (t, x) pairs,
    in the same order, and ends at the same x1 (extras passed as cond)."""
    m, N = _net(), 8
    x0 = torch.randn(4, 3, dtype=F64)
    extras = {"label": torch.tensor([0, 1, 2, 3]), "gain": 0.7}
    grid = [0.0, 1.0] if direction == "forward" else [1.0, 0.0]
    m.record = theirs = []
    x1_fm = ODESolver(velocity_model=m).sample(
        x_init=x0, step_size=1 / N, method="midpoint", time_grid=torch.tensor(grid, dtype=F64),
        **extras)
    m.record = ours = []
    x1 = df.solve(from_flow_matching(m), x0, steps=N, solver="midpoint", t0=grid[0], t1=grid[1],
                  cond=extras)
    assert len(theirs) == len(ours) == 2 * N  # two evaluations per step, N steps
    for k, ((t_a, x_a), (t_b, x_b)) in enumerate(zip(theirs, ours)):
        assert t_a.dim() == t_b.dim() == 0  # the model sees the 0-dim t ODESolver passes
        assert abs(float(t_a) - float(t_b)) <= 1e-15, k
        assert _max_err(x_a, x_b) <= TOL, k
    assert _max_err(x1, x1_fm) <= TOL


def test_step_size_grid_can_add_a_step_time_grid_does_not():
    """torchdiffeq builds its step_size grid as ceil((t1 - t0) / step_size + 1) points: for
    N = 49, 1 / (1/49) rounds to 49.00000000000001 and it takes 50 steps (the last one 1e-16
    long). Giving the N + 1 points as time_grid (step_size=None) matches our N steps exactly."""
    m, N = _net(), 49
    x0 = torch.randn(3, 3, dtype=F64)
    m.record = calls = []
    ODESolver(velocity_model=m).sample(x_init=x0, step_size=1 / N, method="midpoint",
                                       time_grid=torch.tensor([0.0, 1.0], dtype=F64))
    assert len(calls) == 2 * (N + 1)
    m.record = calls = []
    x1_fm = ODESolver(velocity_model=m).sample(
        x_init=x0, step_size=None, method="midpoint",
        time_grid=torch.linspace(0, 1, N + 1, dtype=F64))
    assert len(calls) == 2 * N
    m.record = None
    x1 = df.solve(from_flow_matching(m), x0, steps=N, solver="midpoint")
    assert _max_err(x1, x1_fm) <= TOL


@pytest.mark.parametrize("name", ["condot", "poly2", "cosine", "vp"])
@pytest.mark.parametrize("prediction", ["epsilon", "x1"])
def test_conversion_equals_flow_matching_path(name, prediction):
    """The adapter's velocity equals flow_matching's own ``path.epsilon_to_velocity`` /
    ``target_to_velocity`` of the same model output, for 0-dim t (what solvers pass) and per-sample
    t [B]."""
    m = _net(1)
    path = AffineProbPath(SCHEDULERS[name]())
    u = from_flow_matching(m, path, prediction)
    convert = path.epsilon_to_velocity if prediction == "epsilon" else path.target_to_velocity
    x = torch.randn(5, 3, dtype=F64)
    for tv in (0.03, 0.25, 0.5, 0.8, 0.97):
        t = torch.tensor(tv, dtype=F64)
        out = m(x=x, t=t)
        ref = convert(out, x, t)
        assert _max_err(u(t, x), ref) <= TOL * _terms(u, t, x, out), tv
    tb = torch.tensor([0.03, 0.25, 0.5, 0.8, 0.97], dtype=F64)
    out = m(x=x, t=tb)
    ref = torch.stack([convert(out[i], x[i], tb[i]) for i in range(5)])
    assert _max_err(u(tb, x), ref) <= TOL * max(_terms(u, t, x, out) for t in tb)


class Gaussian(ModelWrapper):
    """The exact epsilon or x1 predictor for data N(mu, diag s^2) on an affine path:
    E[eps | x] = sigma (x - alpha mu) / V,  E[x1 | x] = mu + alpha s^2 (x - alpha mu) / V,
    V = alpha^2 s^2 + sigma^2."""

    def __init__(self, path, mu, s, prediction):
        super().__init__(None)
        self.path, self.mu, self.s, self.prediction = path, mu, s, prediction

    def forward(self, x, t, **extras):
        c = self.path.scheduler(t)
        V = c.alpha_t ** 2 * self.s ** 2 + c.sigma_t ** 2
        r = (x - c.alpha_t * self.mu) / V
        if self.prediction == "epsilon":
            return c.sigma_t * r
        return self.mu + c.alpha_t * self.s ** 2 * r


def _exact_velocity(path, mu, s, t, x):
    """d/dt of the Gaussian transport x_t = alpha mu + sqrt(V) z (z fixed along a trajectory):
    u = d_alpha mu + (alpha d_alpha s^2 + sigma d_sigma) (x - alpha mu) / V."""
    c = path.scheduler(t)
    V = c.alpha_t ** 2 * s ** 2 + c.sigma_t ** 2
    slope = (c.alpha_t * c.d_alpha_t * s ** 2 + c.sigma_t * c.d_sigma_t) / V
    return c.d_alpha_t * mu + slope * (x - c.alpha_t * mu)


@pytest.mark.parametrize("name", ["condot", "poly2", "cosine", "vp"])
@pytest.mark.parametrize("prediction", ["epsilon", "x1"])
def test_closed_form_gaussian(name, prediction):
    """Gaussian data: the exact predictors, converted, give the exact transport velocity (to 1e-13
    of the conversion's terms), and solving it carries x_t0 = alpha mu + sqrt(V) z to mu + s z at
    t = 1 with at least midpoint's second-order error (x4 smaller per halving of h; CondOT's
    straight-line case measures x8). Measured at N = 32: 2e-5 (CondOT) to 4e-3 (poly2)."""
    path = AffineProbPath(SCHEDULERS[name]())
    mu = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    s = torch.tensor([0.3, 1.0, 2.0], dtype=F64)
    u = from_flow_matching(Gaussian(path, mu, s, prediction), path, prediction)
    x = torch.randn(6, 3, dtype=F64) * 2
    for tv in (0.02, 0.3, 0.5, 0.9, 0.98):
        t = torch.tensor(tv, dtype=F64)
        ref = _exact_velocity(path, mu, s, t, x)
        assert _max_err(u(t, x), ref) <= TOL * _terms(u, t, x, u.model(x=x, t=t)), tv
    t0 = 0.02 if prediction == "epsilon" else 0.0  # epsilon has no velocity at alpha_t = 0
    c = path.scheduler(torch.tensor(t0, dtype=F64))
    z = torch.randn(6, 3, dtype=F64)
    start = c.alpha_t * mu + (c.alpha_t ** 2 * s ** 2 + c.sigma_t ** 2).sqrt() * z
    errs = [_max_err(df.solve(u, start, steps=n, t0=t0, t1=1.0), mu + s * z) for n in (16, 32)]
    assert errs[1] <= 1e-2, errs
    assert errs[0] / errs[1] >= 3.4, errs  # at least second order (CondOT: ~8)


def test_singular_conversions_raise_before_any_step():
    """epsilon at alpha_t = 0 (t = 0 on CondOT) and x1 at sigma_t = 0 (t = 1, a backward solve's
    start) have no velocity: the first evaluation raises before the model runs, naming the fix."""
    m = _net()
    m.record = calls = []
    x0 = torch.randn(2, 3, dtype=F64)
    with pytest.raises(ValueError, match="alpha_t = 0"):
        df.solve(from_flow_matching(m, CondOTProbPath(), "epsilon"), x0, steps=4)
    with pytest.raises(ValueError, match="sigma_t = 0"):
        df.solve(from_flow_matching(m, CondOTProbPath(), "x1"), x0, steps=4, t0=1.0, t1=0.0)
    with pytest.raises(ValueError, match="sigma_t = 0"):
        from_flow_matching(m, CondOTProbPath(), "x1")(torch.tensor([0.5, 1.0], dtype=F64), x0)
    assert calls == []
    # the same solves away from the singular point are fine
    df.solve(from_flow_matching(m, CondOTProbPath(), "epsilon"), x0, steps=4, t0=0.01)
    df.solve(from_flow_matching(m, CondOTProbPath(), "x1"), x0, steps=4, t0=0.99, t1=0.0)


def test_bad_input_is_refused_at_construction():
    m = _net()
    with pytest.raises(ValueError, match="unknown prediction 'v'"):
        from_flow_matching(m, CondOTProbPath(), "v")
    with pytest.raises(ValueError, match="needs the flow_matching AffineProbPath"):
        from_flow_matching(m, None, "epsilon")
    discrete = MixtureDiscreteProbPath(PolynomialConvexScheduler(1))
    with pytest.raises(TypeError, match="MixtureDiscreteProbPath is not affine"):
        from_flow_matching(m, discrete, "x1")
    with pytest.raises(TypeError, match="must be a flow_matching ProbPath"):
        from_flow_matching(m, CondOTScheduler(), "epsilon")
    with pytest.raises(TypeError, match="model must be callable"):
        from_flow_matching("net")
    from_flow_matching(m, discrete, "velocity")  # a velocity model needs no conversion


def _targets(B=5):
    torch.manual_seed(0)
    scale = torch.tensor([0.1, 1.0, 3.0, 0.5, 2.0], dtype=F64)[:B, None]
    return torch.randn(B, 3, dtype=F64) * scale, torch.randn(B, 3, dtype=F64)


class Residual(ModelWrapper):
    """x1_hat = x + net(x, t): an x1 predictor whose flow is close to a bijection (a bounded
    random predictor maps all of space into a bounded set, and the optimization then diverges)."""

    def forward(self, x, t, **extras):
        return x + self.model(x=x, t=t, **extras)


@pytest.mark.parametrize("prediction", ["velocity", "x1"])
def test_extras_per_sample_under_optimize_equal_solo_runs(prediction):
    """Per-sample extras (labels) travel with the active rows as the optimizer's active set
    shrinks: each sample ends where its own solo run ends (float64, 1e-9)."""
    m, path = _net(2), CondOTProbPath()
    u = from_flow_matching(m if prediction == "velocity" else Residual(m), path, prediction)
    target, x0 = _targets()
    labels = torch.tensor([0, 3, 1, 2, 3])
    active = []
    res = df.optimize(u, lambda x1: (x1 - target).pow(2).sum(1), x0, steps=4, max_iter=25,
                      cond={"label": labels, "gain": 0.8},
                      callback=lambda info: active.append(int(info.active.sum())))
    assert len(set(active)) > 1, "the active set never shrank: the test would prove nothing"
    for i in range(5):
        solo = df.optimize(u, lambda x1: (x1 - target[i:i + 1]).pow(2).sum(1), x0[i:i + 1],
                           steps=4, max_iter=25, cond={"label": labels[i:i + 1], "gain": 0.8})
        assert _max_err(res.x0[i], solo.x0[0]) <= 1e-9, i
        assert res.nit[i] == solo.nit[0] and res.status[i] == solo.status[0]


@pytest.mark.parametrize("gradient", ["adjoint", "auto"])
def test_gradients_reach_x0_and_the_models_weights(gradient):
    """The adapter is discovered like any velocity: under the adjoint the model's weights get the
    same gradient as under backprop (epsilon model, grid starting after alpha_t = 0)."""
    path = AffineProbPath(CosineScheduler())
    grads = {}
    for scheme in ("backprop", gradient):
        m = _net(3).requires_grad_(True)
        x0 = torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(5))
        x0.requires_grad_(True)
        x1 = df.solve(from_flow_matching(m, path, "epsilon"), x0, steps=5, t0=0.05,
                      gradient=scheme, cond={"label": torch.tensor([1, 2, 3])})
        x1.pow(2).sum().backward()
        grads[scheme] = [x0.grad] + [p.grad for p in m.parameters()]
    for a, b in zip(grads["backprop"], grads[gradient]):
        assert b is not None and _max_err(a, b) <= 1e-12 * max(1.0, float(a.abs().max()))


def test_float32_coefficients_are_formed_in_float64():
    """In float32 the adapter rounds the coefficients once (formed in float64 on the host);
    flow_matching forms them in float32. Both are within float32 rounding of the float64 truth."""
    m = _net(4)
    path = AffineProbPath(CosineScheduler())
    u64 = from_flow_matching(m, path, "epsilon")
    m32 = Net().float().requires_grad_(False)
    m32.load_state_dict(m.state_dict())
    u32 = from_flow_matching(m32, path, "epsilon")
    x = torch.randn(8, 3, dtype=F64)
    for tv in (0.01, 0.5, 0.99):
        ref = u64(torch.tensor(tv, dtype=F64), x)
        t32 = torch.tensor(tv, dtype=torch.float32)
        ours = u32(t32, x.float()).double()
        theirs = path.epsilon_to_velocity(m32(x=x.float(), t=t32), x.float(), t32).double()
        scale = float(ref.abs().max())  # measured: ours <= 1e-7, flow_matching's <= 2.2e-7
        assert _max_err(ours, ref) <= 1e-6 * scale and _max_err(theirs, ref) <= 1e-6 * scale


# ----------------------------------------------- times on an accelerator: no host read of t
# On the CPU a 0-dim t is read on the host (free); anywhere else the coefficients are tensors on
# t's device. These tests force that path on the CPU (``_host_time`` patched) and count host
# reads with dflow_fast.optim.syncs.HostReads, which counts them on any device.

@pytest.mark.parametrize("name", ["condot", "cosine", "vp"])
@pytest.mark.parametrize("prediction", ["epsilon", "x1"])
def test_device_coefficients_equal_the_host_ones(name, prediction, monkeypatch):
    m = _net(1)
    u = from_flow_matching(m, AffineProbPath(SCHEDULERS[name]()), prediction)
    x = torch.randn(5, 3, dtype=F64)
    for tv in (0.03, 0.5, 0.97):
        t = torch.tensor(tv, dtype=F64)
        a, b = u._tensor_coefficients(t, x)
        assert a.shape == b.shape == () and (float(a), float(b)) == u.coefficients(tv)  # bitwise
        host = u(t, x)
        monkeypatch.setattr(fm_adapter, "_host_time", lambda t: False)
        dev = u(t, x)
        monkeypatch.undo()
        assert _max_err(dev, host) <= TOL * _terms(u, t, x, m(x=x, t=t)), tv


def test_device_path_reads_the_host_once_and_never_while_capturing(monkeypatch):
    from dflow_fast.optim.syncs import HostReads
    m = _net(2)
    u = from_flow_matching(m, CondOTProbPath(), "epsilon")
    monkeypatch.setattr(fm_adapter, "_host_time", lambda t: False)
    grid = torch.linspace(0.0, 1.0, 5, dtype=F64)  # computed, not made from Python data
    x = torch.randn(4, 3, dtype=F64)
    with HostReads() as reads:
        u(grid[2], x)
    assert reads.count == 1  # the singular-point check's flag
    with pytest.raises(ValueError, match="alpha_t = 0"):  # the check names the fix, as on the host
        u(grid[0], x)
    monkeypatch.setattr(fm_adapter, "_capturing", lambda t: True)
    with HostReads() as reads:
        out = u(grid[2], x)
    assert reads.count == 0
    a, b = u._tensor_coefficients(grid[2], x)
    assert torch.equal(out, a * x + b * m(x=x, t=grid[2]))


class DeviceNet(ModelWrapper):
    """A flow_matching model with no CPU tensors inside (CUDA graphs capture it)."""

    def __init__(self, dim: int = 3, hidden: int = 16):
        super().__init__(None)
        self.net = nn.Sequential(nn.Linear(dim + 1, hidden), nn.Tanh(), nn.Linear(hidden, dim))

    def forward(self, x, t, **extras):
        return self.net(torch.cat([x, t.reshape(-1, 1).expand(x.shape[0], 1).to(x.dtype)], 1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("gradient", ["adjoint", "backprop", "auto"])
def test_epsilon_adapter_is_captured_by_cuda_graphs(gradient):
    """On CUDA an epsilon model's conversion needs no host read of t, so optimize(cuda_graphs=
    True) captures it (no fallback) and gives the eager run's results (float64)."""
    torch.manual_seed(4)
    m = DeviceNet().double().cuda().requires_grad_(False)
    u = from_flow_matching(m, AffineProbPath(CosineScheduler()), "epsilon")
    g = torch.Generator().manual_seed(6)
    x0, target = (torch.randn(8, 3, generator=g, dtype=F64).cuda() for _ in range(2))
    runs = {graphs: df.optimize(u, lambda x1: (x1 - target).pow(2).sum(1), x0, steps=4, t0=0.05,
                                gradient=gradient, max_iter=10, cuda_graphs=graphs)
            for graphs in (False, True)}
    rep = runs[True].extra["cuda_graphs"]
    assert rep["fallback"] is None and rep["captures"] >= 1 and rep["replays"] > 0
    for name in ("x0", "x1", "loss"):
        a, b = getattr(runs[False], name), getattr(runs[True], name)
        assert _max_err(a, b) <= 1e-10 * max(1.0, float(a.abs().max())), name
