"""autocast=torch.bfloat16 / torch.float16: the velocity under torch.autocast, its output cast
back, everything else in the state's dtype; every scheme equal to the reference loop under the
same autocast; float16 cotangents scaled where they would underflow; bad values refused before
any work."""
from __future__ import annotations

import warnings

import pytest
import torch

import dflow_fast as df
from dflow_fast import reference
from dflow_fast.core.precision import cotangent_scale

from tests.helpers import make_velocity, rel_err

LOW = [torch.bfloat16, torch.float16]
PLAIN = ["auto", "adjoint", "backprop"]


def conv(seed=0):
    v, shape = make_velocity("conv", torch.float32, seed)
    return v, torch.randn(3, *shape)


def gradients(velocity, x0, scale=1.0, ref=False, **kw):
    """x1 and d(scale * loss(x1))/d(x0, weights) through dflow_fast.solve, or the reference."""
    x = x0.clone().requires_grad_(True)
    solve = reference.solve if ref else df.solve
    x1 = solve(velocity, x, steps=4, **kw)
    loss = scale * (x1.square().sum() + x1.sin().sum())
    return [x1, *torch.autograd.grad(loss, [x, *velocity.parameters()])]


@pytest.mark.parametrize("low", LOW)
@pytest.mark.parametrize("solver", ["euler", "midpoint"])
def test_every_scheme_equals_the_reference_loop_under_autocast(low, solver):
    """Same low-precision evaluations at the same float32 states: the schemes agree with the
    plain loop under the same autocast to float32 rounding (measured: bitwise for most), while
    autocast itself moves the gradient by far more than that."""
    v, x0 = conv()
    ref = gradients(v, x0, ref=True, solver=solver, autocast=low)
    fp32 = gradients(v, x0, solver=solver, gradient="backprop")
    for gradient in PLAIN:
        out = gradients(v, x0, solver=solver, gradient=gradient, autocast=low)
        assert out[0].dtype == torch.float32
        for a, b in zip(out, ref):
            assert b.norm() > 0 and rel_err(a, b) <= 1e-5
    assert rel_err(ref[1], fp32[1]) > 1e-5  # the velocity really ran in low precision


@pytest.mark.parametrize("low", LOW)
@pytest.mark.parametrize("solver", ["reversible_heun", "reversible_midpoint"])
def test_reversible_solvers_under_autocast(low, solver):
    v, x0 = conv()
    ref = gradients(v, x0, solver=solver, gradient="backprop", autocast=low)
    for gradient in ("auto", "adjoint", "reversible"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", df.ReconstructionWarning)
            out = gradients(v, x0, solver=solver, gradient=gradient, autocast=low)
        # the adjoint and reversible sweeps evaluate the velocity at reconstructed states that
        # differ from the forward's by float32 roundoff, which can flip float16's roundings:
        # measured 1.9e-4 (float16 on an AVX-512 AMD EPYC; 0 to 7e-8 elsewhere), below
        # float16's unit roundoff 4.9e-4; a wrong sweep is off by O(1)
        for a, b in zip(out, ref):
            assert rel_err(a, b) <= 5e-4


def test_the_velocity_runs_under_autocast_and_its_output_is_cast_back():
    v, x0 = conv()
    seen = []

    def velocity(t, x):
        y = v(t, x)
        seen.append((x.dtype, y.dtype, torch.is_autocast_enabled("cpu")))
        return y

    x = x0.clone().requires_grad_(True)
    x1 = df.solve(velocity, x, steps=2, gradient="adjoint", autocast=torch.bfloat16)
    x1.sum().backward()
    assert x1.dtype == x.grad.dtype == torch.float32
    # the forward sweep's and the backward's recomputed evaluations alike
    assert len(seen) == 8 and set(seen) == {(torch.float32, torch.bfloat16, True)}
    with pytest.raises(ValueError, match="like x"):  # without autocast a bf16 output is refused
        df.solve(lambda t, x: x.bfloat16(), x0, steps=1)


def test_a_callers_autocast_region_is_applied_to_every_evaluation():
    """Inside ``torch.autocast`` the velocity's bf16 output is accepted (it was refused), and the
    adjoint's recomputations, which run in the backward outside the region, use it too."""
    v, x0 = conv()
    want = gradients(v, x0, gradient="adjoint", autocast=torch.bfloat16)
    x = x0.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x1 = df.solve(v, x, steps=4, gradient="adjoint")
    got = torch.autograd.grad(x1.square().sum() + x1.sin().sum(), [x, *v.parameters()])
    for a, b in zip([x1, *got], want):
        assert rel_err(a, b) == 0


@pytest.mark.parametrize("gradient", PLAIN + ["reversible"])
def test_float16_scales_cotangents_that_would_underflow(gradient):
    """A loss scaled by 1e-10: float16's smallest subnormal is 6e-8, so an unscaled backward
    through the network (the reference loop's) loses most of the gradient; scaled, every scheme
    keeps float16's usual accuracy, for x0 (per-sample scale) and for the weights (one scale)."""
    v, x0 = conv()
    solver = "reversible_midpoint" if gradient == "reversible" else "midpoint"
    fp32 = gradients(v, x0, scale=1e-10, solver=solver, gradient="backprop")
    unscaled = gradients(v, x0, scale=1e-10, ref=True, solver="midpoint",
                         autocast=torch.float16)
    out = gradients(v, x0, scale=1e-10, solver=solver, gradient=gradient,
                    autocast=torch.float16)
    # float16's unit roundoff is 4.9e-4; measured: 5e-5 for x0, for the weights at most 1.2e-4
    # on an Intel CPU and 1.0e-3 on an AVX-512 AMD EPYC (its float16 convolution kernels round
    # differently); the bound allows 8 roundoffs, 18x below the unscaled loop's 7e-2
    for k in range(1, len(out)):
        assert rel_err(out[k], fp32[k]) <= 4e-3
    if gradient != "reversible":
        assert rel_err(unscaled[1], fp32[1]) > 1e-2  # measured 7e-2
    # x0 only (optimize's case): the per-sample scale
    x = x0.clone().requires_grad_(True)
    x1 = df.solve(v, x, steps=4, solver=solver, gradient=gradient, params=[],
                  autocast=torch.float16)
    g, = torch.autograd.grad(1e-10 * (x1.square().sum() + x1.sin().sum()), x)
    assert rel_err(g, fp32[1]) <= 1e-3


def test_cotangent_scale():
    c = torch.tensor([[3e-9, -1e-9], [0.3, 0.1], [0.0, 0.0], [5.0, 1.0], [float("nan"), 1.0]])
    s = cotangent_scale([c], per_sample=True)
    assert s.tolist()[2:] == [1.0, 1.0, 1.0]  # zero, already >= 1, NaN: left alone
    m = (c[:2] * s[:2, None]).abs().amax(1)
    assert ((m >= 1) & (m < 2)).all()
    assert (torch.frexp(s)[0] == 0.5).all()  # powers of two: exact to apply and undo
    assert cotangent_scale([c[:2], 2 * c[:2]], per_sample=False).item() == 2.0


def test_optimize_under_autocast_keeps_its_state_in_float32():
    v, shape = make_velocity("mlp", torch.float32)
    v.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    y, x0 = torch.randn(4, *shape, generator=g), torch.randn(4, *shape, generator=g)
    seen = set()

    def cost(x1):
        seen.add(x1.dtype)
        return (x1 - y).square().sum(1)

    kw = dict(steps=4, max_iter=10, regularization=df.ChiPrior(0.01))
    res = df.optimize(v, cost, x0, autocast=torch.bfloat16, **kw)
    ref = df.optimize(v, cost, x0, **kw)
    assert seen == {torch.float32} and res.extra["autocast"] == "bfloat16"
    assert res.extra["compute_dtype"] == "bfloat16"
    assert res.x0.dtype == res.x1.dtype == res.loss.dtype == torch.float32
    assert all(h[-1] < h[0] for h in res.history)
    assert rel_err(res.loss, ref.loss) < 0.2
    # inside a caller's bf16 region: the same run (its dtype is taken, the cost stays float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amb = df.optimize(v, cost, x0, **kw)
    assert seen == {torch.float32} and rel_err(amb.x0, res.x0) == 0


@pytest.mark.parametrize("autocast, x0, match", [
    (torch.float32, torch.randn(2, 3), "autocast must be None, torch.bfloat16 or torch.float16"),
    ("bf16", torch.randn(2, 3), "autocast must be"),
    (torch.bfloat16, torch.randn(2, 3, dtype=torch.float64), "float32 x0"),
])
def test_bad_autocast_is_refused_before_any_work(autocast, x0, match):
    calls = []
    v = lambda t, x: calls.append(1) or -x  # noqa: E731
    with pytest.raises(ValueError, match=match):
        df.solve(v, x0, steps=2, autocast=autocast)
    with pytest.raises(ValueError, match=match):
        df.optimize(v, lambda x1: x1.square().sum(1), x0, steps=2, autocast=autocast)
    with pytest.raises(ValueError, match=match):
        df.backward_blend(v, x0, steps=2, autocast=autocast)
    assert not calls


def test_backward_blend_under_autocast():
    v, x0 = conv()
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = df.backward_blend(v, x0, steps=3, generator=g(), autocast=torch.bfloat16)
    b = df.backward_blend(v, x0, steps=3, generator=g())
    assert a.dtype == torch.float32 and 0 < rel_err(a, b) < 0.05


@pytest.mark.parametrize("gradient", PLAIN)
def test_float16_scale_is_per_sample_when_only_x0_needs_a_gradient(gradient):
    """Samples whose costs differ by 1e10 (one converged, one not): one scale for the batch would
    leave the small sample's cotangent below float16's range; each sample gets its own."""
    v, x0 = conv()
    w = torch.tensor([1.0, 1e-10, 1.0])

    def grad(**kw):
        x = x0.clone().requires_grad_(True)
        x1 = df.solve(v, x, steps=4, params=[], **kw)
        return torch.autograd.grad((w * (x1.square() + x1.sin()).flatten(1).sum(1)).sum(), x)[0]

    fp32, fp16 = grad(gradient="backprop"), grad(gradient=gradient, autocast=torch.float16)
    for i in range(3):
        assert rel_err(fp16[i], fp32[i]) <= 1e-3
