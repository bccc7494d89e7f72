"""cuda_graphs (dflow_fast/graphed.py): buckets, the padded objective and its eager twin, refusals,
and on CUDA graphed == eager (docs/gradients.md, "CUDA graphs").

Exactness: padding changes the number of rows each batched op sees. Where a velocity's per-row
arithmetic does not depend on the row count (``RowVelocity``: elementwise, no GEMM) padded and
unpadded evaluations agree bitwise in float64, and so do whole optimize runs. A GEMM does not
promise that (BLAS picks kernels by the row count: an MLP's rows differ by an ulp between 3 and 4
rows on the CPU), so MLP cases compare to rounding, and on CUDA the graph against its own padded
eager twin bitwise.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import dflow_fast
from dflow_fast import graphed
from dflow_fast.core.plan import make_plan
from dflow_fast.core.velocity import CheckedVelocity
from dflow_fast.graphed import GraphedObjective, bucket_for, buckets
from dflow_fast.optimize import _Objective
from tests.helpers import MLPVelocity, rel_err

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")
SCHEMES = ("adjoint", "backprop", "auto")
B, D, CLASSES = 8, 6, 3


class RowVelocity(nn.Module):
    """v(t, x, label) = tanh(w x + e[label]) (1 + t) - x / 2 for x [n, D]: elementwise per row, so
    a row's arithmetic is the same whatever the batch (no GEMM); ``label`` [n] per-sample cond."""

    def __init__(self, dtype=torch.float64, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(D, generator=g, dtype=dtype))
        self.e = nn.Parameter(torch.randn(CLASSES, D, generator=g, dtype=dtype))

    def forward(self, t, x, label):
        return torch.tanh(x * self.w + self.e.index_select(0, label)) * (1 + t) - 0.5 * x


class Counting(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, t, x, **cond):
        self.calls += 1
        return self.inner(t, x, **cond)


def _data(dtype, device="cpu", seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, D, generator=g, dtype=torch.float64)
    target = torch.randn(B, D, generator=g, dtype=torch.float64)
    label = torch.arange(B) % CLASSES
    dim = torch.tensor([D - k % 3 for k in range(B)], dtype=torch.float64)
    return x0.to(device, dtype), target.to(device, dtype), label.to(device), dim.to(device)


def _objectives(new_velocity, dtype, gradient, prior, device="cpu"):
    """(plain _Objective, padded eager twin) over the same cost and prior and equal velocities
    (two objects: gradient="auto" measures once per velocity object)."""
    x0, target, label, _ = _data(dtype, device)

    def cost(x1):
        return (x1 - target).pow(2).sum(1)

    def make():
        u = CheckedVelocity(new_velocity(), {"label": label}, B)
        plan = make_plan("midpoint", 3, 0.0, 1.0, None, x0, None, gradient=gradient)
        return _Objective(u, plan, cost, prior, gradient, x0.shape, None)
    twin = GraphedObjective.wrap(make(), True)
    twin.capture = False
    return make(), twin, x0


def _same(a, b, exact: bool, tol: float = 1e-6):
    for p, q in zip(a, b):
        if exact:
            assert torch.equal(p, q)
        else:
            assert rel_err(p, q) <= tol


# ---- buckets -----------------------------------------------------------------------------------

def test_buckets_are_powers_of_two_and_the_batch():
    assert buckets(1) == [1] and buckets(2) == [1, 2]
    assert buckets(8) == [1, 2, 4, 8] and buckets(6) == [1, 2, 4, 6]
    assert [bucket_for(n, 8) for n in (1, 2, 3, 4, 5, 8)] == [1, 2, 4, 4, 8, 8]
    assert [bucket_for(n, 6) for n in (3, 5, 6)] == [4, 6, 6]
    for bad in ((0, 8), (9, 8)):
        with pytest.raises(ValueError, match="bucket_for"):
            bucket_for(*bad)
    with pytest.raises(ValueError, match="B must be"):
        buckets(0)


# ---- the padded eager twin against the plain objective -----------------------------------------

@pytest.mark.parametrize("prior", ["chi_fused", "chi_per_sample", "none"])
@pytest.mark.parametrize("gradient", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_padded_twin_equals_the_objective(dtype, gradient, prior):
    dim = _data(dtype)[3]
    reg = {"chi_fused": dflow_fast.ChiPrior(0.1), "none": None,
           "chi_per_sample": dflow_fast.ChiPrior(0.1, dim=dim)}[prior]
    plain, twin, x0 = _objectives(lambda: RowVelocity(dtype), dtype, gradient, reg)
    X = x0.reshape(B, -1)
    exact = dtype == torch.float64
    _same(plain(None, X), twin(None, X), exact)
    before = twin.x1_full.clone()
    g = torch.Generator().manual_seed(5)
    for n in (3, 5, 1, 8):  # buckets 4, 8, 1, 8
        idx = torch.randperm(B, generator=g)[:n].sort().values
        Xn = X[idx] + 0.1 * torch.randn(n, D, generator=g, dtype=torch.float64).to(dtype)
        a, b = plain(idx, Xn), twin(idx, Xn)
        _same(a, b, exact)
        assert all(t.shape[0] == n for t in b)
        # an evaluation writes no row of the optimizer's buffer (padding goes to the scratch row
        # of a copy): the optimizer alone moves accepted rows into it
        assert torch.equal(twin.x1_full, before)
    assert torch.equal(plain.nfe, twin.nfe) and plain.u.calls == twin.calls


@pytest.mark.parametrize("gradient", SCHEMES)
def test_padded_twin_of_a_gemm_velocity_agrees_to_rounding(gradient):
    torch.manual_seed(0)
    net = MLPVelocity().double()
    plain, twin, x0 = _objectives(lambda: (lambda t, x, label: net(t, x)), torch.float64,
                                  gradient, dflow_fast.ChiPrior(0.1))
    X = x0.reshape(B, -1)
    plain(None, X), twin(None, X)
    idx = torch.tensor([1, 4, 6])
    for p, q in zip(plain(idx, X[idx] * 0.9), twin(idx, X[idx] * 0.9)):
        assert rel_err(q, p) <= 1e-13


@pytest.mark.parametrize("where", [0, 2])  # the first evaluated row is also the padding's source
def test_a_nan_row_stays_in_its_row(where):
    plain, twin, x0 = _objectives(RowVelocity, torch.float64, "adjoint", dflow_fast.ChiPrior(0.1))
    X = x0.reshape(B, -1)
    twin(None, X)
    idx = torch.tensor([1, 3, 6])  # bucket 4: one padded row
    clean = twin(idx, X[idx])
    bad = X[idx].clone()
    bad[where, 2] = math.nan
    f, g, x1 = twin(idx, bad)
    assert math.isnan(f[where]) and bool(torch.isnan(x1[where]).any())
    keep = [r for r in range(3) if r != where]
    assert bool(torch.isfinite(f[keep]).all() and torch.isfinite(g[keep]).all())
    for new, ref in zip((f, g, x1), clean):
        assert torch.equal(new[keep], ref[keep])


# ---- optimize: validation, refusal, the twin end to end -----------------------------------------

def _optimize(velocity, dtype=torch.float64, device="cpu", **kw):
    x0, target, label, _ = _data(dtype, device)
    stop = torch.linspace(0.5, 3.0, B, dtype=torch.float64)  # samples stop at different times
    return dflow_fast.optimize(velocity, lambda x1: (x1 - target).pow(2).sum(1), x0, steps=3,
                               cond={"label": label}, max_iter=12, stop_loss=stop,
                               regularization=dflow_fast.ChiPrior(0.05), **kw)


def test_cuda_graphs_true_on_the_cpu_is_refused_before_any_work():
    v = Counting(RowVelocity())
    with pytest.raises(ValueError, match=r"cuda_graphs=True needs x0 on a CUDA device"):
        _optimize(v, cuda_graphs=True)
    assert v.calls == 0
    with pytest.raises(ValueError, match=r"cuda_graphs=True needs x0 on a CUDA device"):
        dflow_fast.ValueAndGrad(v, lambda x1: x1.sum(1), cuda_graphs=True)(torch.randn(2, D))
    assert v.calls == 0


@pytest.mark.parametrize("bad", [1, 0, None, "yes", "AUTO"])
def test_bad_cuda_graphs_values_are_refused_naming_the_argument(bad):
    v = Counting(RowVelocity())
    with pytest.raises(ValueError, match="cuda_graphs must be False, True or 'auto'"):
        _optimize(v, cuda_graphs=bad)
    with pytest.raises(ValueError, match="cuda_graphs must be"):
        dflow_fast.ValueAndGrad(v, lambda x1: x1.sum(1), cuda_graphs=bad)
    assert v.calls == 0


def test_reversible_gradient_is_refused_under_true(monkeypatch):
    monkeypatch.setattr(graphed, "_TWIN", True)  # past the device check
    v = Counting(RowVelocity())
    with pytest.raises(ValueError, match="cuda_graphs=True cannot capture gradient='reversible'"):
        _optimize(v, solver="reversible_heun", gradient="reversible", cuda_graphs=True)
    assert v.calls == 0


def test_auto_on_the_cpu_is_the_eager_run():
    a = _optimize(RowVelocity(), cuda_graphs="auto")
    b = _optimize(RowVelocity())
    assert torch.equal(a.x0, b.x0) and a.status == b.status
    assert a.extra["cuda_graphs"] == {"mode": "auto", "fallback": "x0 is on cpu"}
    assert b.extra["cuda_graphs"] is None


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
@pytest.mark.parametrize("gradient", SCHEMES)
def test_optimize_through_the_padded_twin_equals_the_plain_run(monkeypatch, gradient, optimizer):
    plain = _optimize(RowVelocity(), gradient=gradient, optimizer=optimizer)
    monkeypatch.setattr(graphed, "_TWIN", True)
    twin = _optimize(RowVelocity(), gradient=gradient, optimizer=optimizer, cuda_graphs=True)
    assert len(set(plain.nit.tolist())) > 1 or optimizer == "adam"  # the active set shrank
    for name in ("x0", "x1", "loss", "nit", "nfev", "nfe"):
        assert torch.equal(getattr(plain, name), getattr(twin, name)), name
    assert plain.status == twin.status and plain.history == twin.history
    assert plain.velocity_calls == twin.velocity_calls
    rep = twin.extra["cuda_graphs"]
    assert rep["capture"] is False and rep["captures"] == 0 and rep["fallback"] is None
    assert rep["eager_evaluations"] == int(twin.nfev.max())
    assert len(rep["bucket_uses"]) > 1 or optimizer == "adam"  # padded buckets below B ran


class _EagerGraph:
    """Stands in for a CUDA graph on the CPU: replay re-runs the slot's computation on its static
    buffers (what a replay does with the recorded kernels)."""

    def __init__(self, obj, slot):
        self.obj, self.slot = obj, slot

    def replay(self):
        self.slot.out = self.obj._compute(self.slot, self.obj.memory_budget)


def _fake_capture(fail: str | None):
    def capture(self, slot):
        if fail:
            raise RuntimeError(fail)
        calls, solves = self._calls()
        self._compute(slot, self.memory_budget)  # the warm-up
        slot.calls, slot.solves = self._calls()[0] - calls, self._calls()[1] - solves
        self.warmup_calls += slot.calls
        slot.graph = _EagerGraph(self, slot)
    return capture


def _capturing(monkeypatch, fail: str | None = None):
    """optimize(cuda_graphs=...) on the CPU through the capture bookkeeping (first use eager,
    capture on the second, replays after; a failing capture) with :class:`_EagerGraph`."""
    monkeypatch.setattr(graphed, "_TWIN", True)
    monkeypatch.setattr(GraphedObjective, "wrap", classmethod(
        lambda cls, obj, mode: cls(obj.u, obj.plan, obj.cost, obj.reg, obj.gradient, obj.shape,
                                   obj.memory_budget, capture=True, mode=mode)))
    monkeypatch.setattr(GraphedObjective, "_capture", _fake_capture(fail))


@pytest.mark.parametrize("gradient", SCHEMES)
def test_capture_bookkeeping_replays_buckets_and_counts_like_eager(monkeypatch, gradient):
    plain = _optimize(RowVelocity(), gradient=gradient)
    _capturing(monkeypatch)
    graph = _optimize(RowVelocity(), gradient=gradient, cuda_graphs=True)
    for name in ("x0", "x1", "loss", "nit", "nfev", "nfe"):
        assert torch.equal(getattr(plain, name), getattr(graph, name)), name
    assert plain.status == graph.status and plain.velocity_calls == graph.velocity_calls
    rep = graph.extra["cuda_graphs"]
    uses = rep["bucket_uses"]
    assert rep["buckets"] == sorted(int(b) for b, k in uses.items() if k >= 2)
    assert 1 <= rep["captures"] <= len(buckets(B)) and rep["fallback"] is None
    # each bucket: one eager use, then a capture and replays; plus the first (full) evaluation
    assert rep["replays"] == sum(k - 1 for k in uses.values() if k >= 2)
    assert rep["eager_evaluations"] == 1 + sum(1 for k in uses.values())
    assert rep["warmup_calls"] > 0


def test_a_failed_capture_raises_under_true_and_falls_back_under_auto(monkeypatch):
    plain = _optimize(RowVelocity())
    sync = "called a synchronizing CUDA operation"
    _capturing(monkeypatch, fail=sync)
    with pytest.raises(RuntimeError, match="cuda_graphs=True: the objective synchronizes with the "
                                           "host.*cuda_graphs='auto'"):
        _optimize(RowVelocity(), cuda_graphs=True)
    auto = _optimize(RowVelocity(), cuda_graphs="auto")
    for name in ("x0", "loss", "nit", "nfe"):
        assert torch.equal(getattr(plain, name), getattr(auto, name)), name
    assert plain.velocity_calls == auto.velocity_calls
    rep = auto.extra["cuda_graphs"]
    assert rep["captures"] == 0 and sync in rep["fallback"]
    _capturing(monkeypatch, fail="operation not permitted when stream is capturing")
    with pytest.raises(RuntimeError, match="the capture of the objective failed"):
        _optimize(RowVelocity(), cuda_graphs=True)


def test_value_and_grad_is_the_gradient_of_the_solve():
    vel = RowVelocity()
    x0, target, label, _ = _data(torch.float64)

    def cost(x1):
        return (x1 - target).pow(2).sum(1)
    vg = dflow_fast.ValueAndGrad(vel, cost, steps=3, cond={"label": label}, gradient="adjoint")
    for k in range(3):  # repeated calls, new x0 each time
        x = (x0 * (1 + 0.1 * k)).requires_grad_(True)
        f_ref = cost(dflow_fast.solve(vel, x, steps=3, cond={"label": label},
                                      gradient="backprop"))
        g_ref, = torch.autograd.grad(f_ref.sum(), x)
        f, g = vg(x.detach())
        assert rel_err(f, f_ref) <= 1e-13 and rel_err(g, g_ref) <= 1e-12
    f1, g1 = dflow_fast.value_and_grad(vel, cost, x0, steps=3, cond={"label": label},
                                       gradient="adjoint")
    f2, g2 = vg(x0)
    assert torch.equal(f1, f2) and torch.equal(g1, g2)


# ---- CUDA: graphed == eager ---------------------------------------------------------------------

def _cuda_backends() -> list[str]:
    return ["torch", "cuda", "triton"]


def _backend_or_skip(name: str) -> None:
    from dflow_fast.ops import registry
    try:
        registry.resolve(name, torch.device("cuda"))
    except (registry.BackendUnavailable, ValueError) as e:
        pytest.skip(f"backend {name!r} unavailable: {e}")


@needs_cuda
@pytest.mark.parametrize("backend", _cuda_backends())
@pytest.mark.parametrize("gradient", SCHEMES)
def test_graphed_optimize_equals_eager_float64(gradient, backend):
    _backend_or_skip(backend)
    kw = dict(gradient=gradient, backend=backend, device="cuda")
    eager = _optimize(RowVelocity().cuda(), **kw)
    graph = _optimize(RowVelocity().cuda(), cuda_graphs=True, **kw)
    assert len(set(eager.nit.tolist())) > 1  # the active set shrank through several buckets
    for name in ("x0", "x1", "loss", "nit", "nfev", "nfe"):
        assert torch.equal(getattr(eager, name).cpu(), getattr(graph, name).cpu()), name
    assert eager.status == graph.status and eager.velocity_calls == graph.velocity_calls
    rep = graph.extra["cuda_graphs"]
    assert rep["fallback"] is None and 1 <= rep["captures"] <= len(buckets(B))
    assert rep["replays"] > 0 and set(rep["buckets"]) <= set(buckets(B))


@needs_cuda
@pytest.mark.parametrize("gradient", SCHEMES)
def test_graphed_optimize_float32_gemm_velocity(monkeypatch, gradient):
    def run(**kw):
        torch.manual_seed(0)
        net = MLPVelocity().cuda()
        return _optimize(lambda t, x, label: net(t, x), torch.float32, "cuda",
                         gradient=gradient, **kw)
    eager, graph = run(), run(cuda_graphs=True)
    monkeypatch.setattr(graphed, "_TWIN", True)
    twin = run(cuda_graphs=True)
    # the graph replays its padded eager twin's kernels (cuBLAS may pick other GEMM kernels on
    # the capture stream, so to float32 rounding carried through a few L-BFGS iterations)
    assert rel_err(graph.x0, twin.x0) <= 1e-4 and rel_err(graph.loss, twin.loss) <= 1e-4
    assert graph.extra["cuda_graphs"]["replays"] > 0
    assert rel_err(graph.loss.mean(), eager.loss.mean()) <= 1e-3


@needs_cuda
def test_graphed_nan_sample_stays_in_its_row():
    x0, target, label, _ = _data(torch.float64, "cuda")
    target = target.clone()
    target[2, 0] = math.nan

    def run(**kw):
        return dflow_fast.optimize(RowVelocity().cuda(), lambda x1: (x1 - target).pow(2).sum(1),
                                   x0, steps=3, cond={"label": label}, max_iter=8, **kw)
    eager, graph = run(), run(cuda_graphs=True)
    assert graph.status[2] == "nonfinite" and eager.status == graph.status
    keep = [i for i in range(B) if i != 2]
    assert torch.equal(eager.x0[keep], graph.x0[keep])
    assert bool(torch.isfinite(graph.loss[keep]).all())


class SyncVelocity(RowVelocity):
    def forward(self, t, x, label):
        if x.abs().max().item() > 1e6:  # data-dependent control flow: a host read
            x = x.clamp(-1e6, 1e6)
        return super().forward(t, x, label)


@needs_cuda
def test_host_sync_is_refused_under_true_and_falls_back_under_auto():
    with pytest.raises(RuntimeError, match="cuda_graphs=True: the objective synchronizes"):
        _optimize(SyncVelocity().cuda(), device="cuda", cuda_graphs=True)
    auto = _optimize(SyncVelocity().cuda(), device="cuda", cuda_graphs="auto")
    eager = _optimize(SyncVelocity().cuda(), device="cuda")
    assert torch.equal(auto.x0, eager.x0) and auto.status == eager.status
    rep = auto.extra["cuda_graphs"]
    assert rep["captures"] == 0 and "synchronizes" in rep["fallback"]


@needs_cuda
@pytest.mark.parametrize("gradient", SCHEMES)
def test_graphed_value_and_grad_equals_eager(gradient):
    x0, target, label, _ = _data(torch.float64, "cuda")
    vel = RowVelocity().cuda()

    def cost(x1):
        return (x1 - target).pow(2).sum(1)
    kw = dict(steps=3, cond={"label": label}, gradient=gradient)
    graph = dflow_fast.ValueAndGrad(vel, cost, cuda_graphs=True, **kw)
    eager = dflow_fast.ValueAndGrad(vel, cost, cuda_graphs=False, **kw)
    for k in range(4):
        x = x0 * (1 + 0.1 * k)
        for p, q in zip(graph(x), eager(x)):
            assert torch.equal(p, q)
    rep = graph.objective.report()
    assert rep["captures"] == 1 and rep["replays"] == 3 and rep["fallback"] is None  # 1 eager
