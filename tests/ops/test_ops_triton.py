"""Triton kernels (dflow_fast.kernels) against their PyTorch twins in dflow_fast.ops.twins.

On a machine without CUDA the kernels run on CPU tensors under the Triton interpreter; the
variable must be set before triton is first imported, hence the top of this file. The
interpreter is slow, so sizes stay at a few thousand elements.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install triton, or the "
                                     "package's test extra)")

import dflow_fast  # noqa: E402
from dflow_fast.ops import twins as ref  # noqa: E402
from dflow_fast.ops import registry as backends  # noqa: E402
from dflow_fast import kernels  # noqa: E402
from tests.helpers import make_velocity, rel_err  # noqa: E402

if torch.cuda.is_available():
    DEVICE = torch.device("cuda")
elif os.environ.get("TRITON_INTERPRET") == "1":
    DEVICE = torch.device("cpu")
else:
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1: the Triton kernels cannot run",
                allow_module_level=True)

CUDA = DEVICE.type == "cuda"
# The interpreter's fp32 -> bf16 cast truncates instead of rounding to nearest (GPUs round), so
# bf16 is compared on CUDA only; fp16 rounds correctly in both.
DTYPES = [torch.float32, torch.float64, torch.float16] + ([torch.bfloat16] if CUDA else [])
#: absolute slack on top of twice PyTorch's own error at the same precision
EPS = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-5, torch.bfloat16: 1e-5}
# element counts: single, odd, just under and just over a power of two (partial tail blocks)
SHAPES = [(1,), (7,), (3, 341), (1, 1023), (17, 241), (1, 4097)]


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    # The tensors here are tiny: on a busy CPU torch's intra-op threads only add contention
    # (measured here: the optimize test took 3x longer with 2 threads than with 1).
    if CUDA:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _id(v) -> str:
    if isinstance(v, torch.dtype):
        return str(v).removeprefix("torch.")
    if isinstance(v, tuple):
        return "x".join(map(str, v))
    return str(v)


def randn(*shape, dtype, scale=1.0):
    return torch.randn(*shape, dtype=torch.float64, device=DEVICE).mul_(scale).to(dtype)


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values in a strided view (every other column of a wider buffer)."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    view = wide[..., ::2]
    assert not view.is_contiguous() or t.shape[-1] == 1
    return view


def assert_close(out, inputs, fn, dtype):
    """out vs the float64 reference: err <= 2 * err(PyTorch at dtype) + EPS[dtype], per output."""
    outs = out if isinstance(out, tuple) else (out,)
    exact = fn(*[t.double() if isinstance(t, torch.Tensor) else t for t in inputs])
    same = fn(*inputs)
    exact = exact if isinstance(exact, tuple) else (exact,)
    same = same if isinstance(same, tuple) else (same,)
    for k, (o, e, s) in enumerate(zip(outs, exact, same)):
        assert o.shape == s.shape and o.dtype == s.dtype, (k, o.shape, o.dtype, s.shape, s.dtype)
        err, err_torch = rel_err(o, e), rel_err(s, e)
        assert err <= 2 * err_torch + EPS[dtype], (k, err, err_torch)


# ---------------------------------------------------------------------------------------------
# elementwise ops

@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_axpy(shape, dtype):
    x, v = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype)
    h = 0.1 + 0.3 * torch.rand(()).item()
    assert_close(kernels.axpy(x, v, h), (x, v, h), ref.axpy, dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_adjoint_euler(shape, dtype):
    a, w = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype)
    assert_close(kernels.adjoint_euler(a, w), (a, w), ref.adjoint_euler, dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_adjoint_midpoint(shape, dtype):
    a, w2, w1 = (randn(*shape, dtype=dtype) for _ in range(3))
    assert_close(kernels.adjoint_midpoint(a, w2, w1), (a, w2, w1), ref.adjoint_midpoint, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_elementwise_noncontiguous(dtype):
    x, v, w = (noncontiguous(randn(5, 3, 67, dtype=dtype)) for _ in range(3))
    xt = randn(67, 5, dtype=dtype).t()  # transposed: another non-contiguous layout
    vt = randn(67, 5, dtype=dtype).t()
    assert_close(kernels.axpy(x, v, -0.37), (x, v, -0.37), ref.axpy, dtype)
    assert_close(kernels.axpy(xt, vt, 0.25), (xt, vt, 0.25), ref.axpy, dtype)
    assert_close(kernels.adjoint_euler(x, w), (x, w), ref.adjoint_euler, dtype)
    assert_close(kernels.adjoint_midpoint(x, w, v), (x, w, v), ref.adjoint_midpoint, dtype)


def test_axpy_float64_step_is_exact():
    # h is a float64 step (e.g. 1/3): the kernel must not round it to float32.
    x, v = randn(4, 9, dtype=torch.float64), randn(4, 9, dtype=torch.float64)
    out = kernels.axpy(x, v, 1.0 / 3.0)
    assert rel_err(out, ref.axpy(x, v, 1.0 / 3.0)) <= 1e-15


# ---------------------------------------------------------------------------------------------
# reversible solvers' state updates

#: op name -> (number of tensor inputs, scalar arguments: steps, negated steps of the inverse
#: sweep, couplings)
REVERSIBLE_OPS = {
    "heun_predict": (3, (-0.37,)),
    "heun_step": (4, (0.37, -0.21)),
    "heun_adjoint": (3, (0.37, 0.21)),
    "coupled_forward": (3, (0.7, 0.37)),
    "coupled_inverse": (3, (0.7, -0.37)),
    "coupled_adjoint": (3, (0.9, 0.37)),
}


def _check_reversible(name, tensors):
    scalars = REVERSIBLE_OPS[name][1]
    inputs = (*tensors, *scalars)
    out = getattr(kernels, name)(*inputs)
    assert all(o.is_contiguous() for o in (out if isinstance(out, tuple) else (out,)))
    assert_close(out, inputs, getattr(ref, name), tensors[0].dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("name", list(REVERSIBLE_OPS))
def test_reversible_op(name, dtype, shape):
    n_in = REVERSIBLE_OPS[name][0]
    _check_reversible(name, [randn(*shape, dtype=dtype) for _ in range(n_in)])


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("name", list(REVERSIBLE_OPS))
def test_reversible_op_noncontiguous(name, dtype):
    views = [noncontiguous(randn(5, 3, 67, dtype=dtype)),
             randn(5, 67, 3, dtype=dtype).transpose(1, 2),  # transposed
             randn(5, 1, 67, dtype=dtype).expand(5, 3, 67),  # stride 0
             randn(5, 3, 67, dtype=dtype)]
    n_in = REVERSIBLE_OPS[name][0]
    _check_reversible(name, views[:n_in])


def test_reversible_ops_float64_scalars_are_exact():
    # Steps like 1/3 and couplings like 0.9 are float64 values: the kernels must not round them
    # to float32 (each scalar travels as three fp32-exact parts).
    a, b, c, d = (randn(4, 9, dtype=torch.float64) for _ in range(4))
    h, hn, lam = 1.0 / 3.0, 1.0 / 7.0, 0.9
    pairs = [(kernels.heun_predict(a, b, c, h), ref.heun_predict(a, b, c, h)),
             (kernels.heun_step(a, b, c, d, h, hn), ref.heun_step(a, b, c, d, h, hn)),
             (kernels.heun_adjoint(a, b, c, h, hn), ref.heun_adjoint(a, b, c, h, hn)),
             (kernels.coupled_forward(a, b, c, lam, h), ref.coupled_forward(a, b, c, lam, h)),
             (kernels.coupled_inverse(a, b, c, lam, h), ref.coupled_inverse(a, b, c, lam, h)),
             (kernels.coupled_adjoint(a, b, c, lam, h), ref.coupled_adjoint(a, b, c, lam, h))]
    for out, want in pairs:
        for o, w in zip(out if isinstance(out, tuple) else (out,),
                        want if isinstance(want, tuple) else (want,)):
            assert rel_err(o, w) <= 1e-15


# ---------------------------------------------------------------------------------------------
# chi prior

CHI_SHAPES = [(1, 1), (1, 7), (3, 1023), (2, 4097)]


@pytest.mark.parametrize("shape", CHI_SHAPES, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_chi_prior(shape, dtype):
    x = randn(*shape, dtype=dtype)
    w = 0.1 + torch.rand(()).item()
    sq, value, grad = out = kernels.chi_prior(x, w)
    acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    assert sq.dtype == value.dtype == acc and grad.dtype == dtype
    assert_close(out, (x, w), ref.chi_prior, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_chi_prior_noncontiguous_and_off_shell(dtype):
    x = randn(300, 3, dtype=dtype, scale=0.5).t()  # [3, 300], strided, ||x||^2 far from D
    assert not x.is_contiguous()
    assert_close(kernels.chi_prior(x, 0.3), (x, 0.3), ref.chi_prior, dtype)


def test_chi_prior_many_chunks(monkeypatch):
    # A row split into several chunks of several blocks each (what D ~ 1e6 does with the
    # defaults), exercised at small D by lowering the chunk limit.
    from dflow_fast.kernels import reductions
    monkeypatch.setattr(reductions, "MAX_CHUNKS", 2)
    assert reductions._chunks(9000) == (2, 3)
    x = randn(2, 9000, dtype=torch.float64)
    assert_close(kernels.chi_prior(x, 0.7), (x, 0.7), ref.chi_prior, torch.float64)


# ---------------------------------------------------------------------------------------------
# L-BFGS two-loop recursion

def lbfgs_inputs(B, m, D, empty, dtype):
    """Curvature pairs like the optimizer's (y ~ A s with <y, s> > 0); the oldest `empty`
    slots of every sample are unused (zero with rho = 0)."""
    g = randn(B, D, dtype=torch.float64)
    S = randn(B, m, D, dtype=torch.float64)
    Y = 0.5 * S + 0.1 * randn(B, m, D, dtype=torch.float64)
    rho = 1.0 / (S * Y).sum(-1)
    S[:, :empty], Y[:, :empty], rho[:, :empty] = 0.0, 0.0, 0.0
    gamma = 0.5 + torch.rand(B, dtype=torch.float64, device=DEVICE)
    return tuple(t.to(dtype) for t in (g, S, Y, rho, gamma))


LBFGS_CASES = [  # (B, m, D, empty slots)
    (1, 0, 7, 0),       # no history: d = -gamma g
    (3, 1, 1, 0),
    (1, 3, 1023, 0),    # batch of one
    (3, 4, 1023, 1),    # partly empty history
    (2, 5, 4097, 3),
    (2, 3, 300, 3),     # all slots empty
    (4, 10, 257, 0),    # the optimizer's default m
]


@pytest.mark.parametrize("case", LBFGS_CASES, ids=lambda c: "B{}-m{}-D{}-empty{}".format(*c))
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_lbfgs_direction(case, dtype):
    args = lbfgs_inputs(*case, dtype)
    assert_close(kernels.lbfgs_direction(*args), args, ref.lbfgs_direction, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_lbfgs_direction_noncontiguous(dtype):
    g, S, Y, rho, gamma = lbfgs_inputs(3, 4, 513, 1, dtype)
    S = S.transpose(0, 1).contiguous().transpose(0, 1)  # [B, m, D] view of an [m, B, D] buffer
    g, Y = noncontiguous(g), noncontiguous(Y)
    assert not (S.is_contiguous() or g.is_contiguous() or Y.is_contiguous())
    args = (g, S, Y, rho, gamma)
    assert_close(kernels.lbfgs_direction(*args), args, ref.lbfgs_direction, dtype)


# ---------------------------------------------------------------------------------------------
# registration, autograd, bad input

def _opcheck_utils():
    # Graph capture (test_aot_dispatch_*) needs compiled kernels: CUDA only.
    if CUDA:
        return None
    return ("test_schema", "test_autograd_registration", "test_faketensor")


def test_opcheck():
    from torch.library import opcheck
    f64 = torch.float64
    x, v, w = (randn(3, 5, dtype=f64) for _ in range(3))
    utils = _opcheck_utils()
    kw = {} if utils is None else {"test_utils": utils}
    opcheck(torch.ops.dflow_fast_triton.axpy.default, (x, v, 0.3), **kw)
    opcheck(torch.ops.dflow_fast_triton.adjoint_euler.default, (x, v), **kw)
    opcheck(torch.ops.dflow_fast_triton.adjoint_midpoint.default, (x, v, w), **kw)
    opcheck(torch.ops.dflow_fast_triton.chi_prior.default, (x.requires_grad_(), 0.3), **kw)
    opcheck(torch.ops.dflow_fast_triton.lbfgs_direction.default, lbfgs_inputs(2, 3, 6, 1, f64),
            **kw)
    for name, (n_in, scalars) in REVERSIBLE_OPS.items():
        op = getattr(torch.ops.dflow_fast_triton, name).default
        ts = [randn(3, 5, dtype=f64) for _ in range(n_in)]
        opcheck(op, (*ts, *scalars), **kw)
        opcheck(op, (*[t.requires_grad_() for t in ts], *scalars), **kw)


def test_autograd():
    f64 = torch.float64
    x, v, w = (randn(2, 3, dtype=f64).requires_grad_() for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b: kernels.axpy(a, b, 0.7), (x, v))
    assert torch.autograd.gradcheck(kernels.adjoint_euler, (x, v))
    assert torch.autograd.gradcheck(kernels.adjoint_midpoint, (x, v, w))
    # chi_prior: every output differentiable, like the reference and the C++ op (the grad
    # output's VJP is the prior's Hessian-vector product)
    assert torch.autograd.gradcheck(lambda a: kernels.chi_prior(a, 0.4), (x,))


@pytest.mark.parametrize("name", list(REVERSIBLE_OPS))
def test_reversible_op_autograd(name):
    """gradcheck, and the backward against autograd through the twin with a cotangent on only the
    first output (the others None, as for heun_step's unused prediction at the last step)."""
    n_in, scalars = REVERSIBLE_OPS[name]
    ts = [randn(2, 3, dtype=torch.float64).requires_grad_() for _ in range(n_in)]
    assert torch.autograd.gradcheck(lambda *a: getattr(kernels, name)(*a, *scalars), ts)
    grads = []
    for fn in (getattr(kernels, name), getattr(ref, name)):
        leaves = [t.detach().clone().requires_grad_() for t in ts]
        out = fn(*leaves, *scalars)
        first = out[0] if isinstance(out, tuple) else out
        first.backward(torch.linspace(-1, 2, first.numel(), dtype=torch.float64,
                                      device=DEVICE).reshape(first.shape))
        grads.append([leaf.grad for leaf in leaves])
    for a, b in zip(*grads):
        assert (a is None) == (b is None)
        if b is not None:
            assert rel_err(a, b) <= 1e-15


def test_lbfgs_direction_not_differentiable():
    g, S, Y, rho, gamma = lbfgs_inputs(2, 2, 5, 0, torch.float64)
    d = kernels.lbfgs_direction(g.requires_grad_(), S, Y, rho, gamma)
    with pytest.raises(RuntimeError, match="not differentiable"):
        d.sum().backward()


def test_bad_input():
    f32, f64 = torch.float32, torch.float64
    x = randn(2, 5, dtype=f32)
    with pytest.raises(ValueError, match="shape"):
        kernels.axpy(x, randn(2, 6, dtype=f32), 0.1)
    with pytest.raises(ValueError, match="dtype"):
        kernels.adjoint_euler(x, x.double())
    with pytest.raises(ValueError, match="w1"):
        kernels.adjoint_midpoint(x, x, randn(5, 2, dtype=f32))
    with pytest.raises(TypeError, match="dtype"):
        kernels.axpy(x.int(), x.int(), 0.1)
    with pytest.raises(TypeError, match="h"):
        kernels.axpy(x, x, torch.tensor(0.1))
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        kernels.chi_prior(randn(2, 3, 4, dtype=f32), 0.1)
    g, S, Y, rho, gamma = lbfgs_inputs(2, 3, 5, 0, f64)
    with pytest.raises(ValueError, match="rho"):
        kernels.lbfgs_direction(g, S, Y, rho[:, :2], gamma)
    with pytest.raises(ValueError, match="gamma"):
        kernels.lbfgs_direction(g, S, Y, rho, gamma.float())
    with pytest.raises(ValueError, match="heun_step: fnext must match y in shape"):
        kernels.heun_step(x, x, x, randn(5, 2, dtype=f32), 0.1, 0.2)
    with pytest.raises(ValueError, match="coupled_adjoint: w must match a_z .*float64"):
        kernels.coupled_adjoint(x, x, x.double(), 0.5, 0.1)
    with pytest.raises(TypeError, match="heun_adjoint: hnext must be a real number"):
        kernels.heun_adjoint(x, x, x, 0.1, torch.tensor(0.2))
    with pytest.raises(ValueError, match="coupled_forward: lam must be finite"):
        kernels.coupled_forward(x, x, x, float("nan"), 0.1)
    with pytest.raises(ValueError, match="coupled_inverse: lam must be nonzero"):
        kernels.coupled_inverse(x, x, x, 0.0, 0.1)


# ---------------------------------------------------------------------------------------------
# through the library: backend="triton" vs backend="torch"

def test_backend_loads():
    ops = backends.load("triton")
    assert ops.name == "triton" and ops.lbfgs_direction is kernels.lbfgs_direction
    assert ops.fallbacks == ()
    for name in backends.REVERSIBLE_OP_NAMES:
        assert getattr(ops, name) is getattr(kernels, name)
    assert backends.resolve("triton", DEVICE).name == "triton"


@pytest.mark.parametrize("gradient", ["adjoint", "backprop"])
@pytest.mark.parametrize("solver", ["euler", "midpoint"])
@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_solve_gradient_matches_torch(kind, solver, gradient):
    u, shape = make_velocity(kind, torch.float64)
    u = u.to(DEVICE)
    x0 = randn(2, *shape, dtype=torch.float64)
    cot = randn(2, *shape, dtype=torch.float64)
    res = {}
    for backend in ("torch", "triton"):
        x = x0.clone().requires_grad_()
        x1 = dflow_fast.solve(u, x, steps=3, solver=solver, gradient=gradient, params=[],
                              backend=backend)
        gx, = torch.autograd.grad(x1, x, cot)
        res[backend] = (x1.detach(), gx)
    assert rel_err(res["triton"][0], res["torch"][0]) <= 1e-12
    assert rel_err(res["triton"][1], res["torch"][1]) <= 1e-12


def test_optimize_matches_torch():
    u, shape = make_velocity("mlp", torch.float64)
    u = u.to(DEVICE)
    x0 = randn(3, *shape, dtype=torch.float64)
    target = randn(3, *shape, dtype=torch.float64)

    def cost(x1):
        return ((x1 - target) ** 2).sum(1)

    out = {b: dflow_fast.optimize(u, cost, x0, steps=3, solver="midpoint", max_iter=4,
                                  history_size=3, regularization=dflow_fast.ChiPrior(0.1),
                                  backend=b)
           for b in ("torch", "triton")}
    a, b = out["triton"], out["torch"]
    assert a.status == b.status and a.nit.tolist() == b.nit.tolist()
    assert int(a.nit.min()) >= 2  # the two-loop recursion ran with a history
    assert rel_err(a.x0, b.x0) <= 1e-10
    assert rel_err(a.loss, b.loss) <= 1e-10


@pytest.mark.parametrize("gradient", ["reversible", "backprop"])
@pytest.mark.parametrize("solver", ["reversible_heun", "reversible_euler", "reversible_midpoint"])
def test_reversible_solve_gradient_matches_torch(solver, gradient):
    """The reversible solvers with the Triton kernels for their state updates: x1 and the
    gradient as with backend="torch" (the twins)."""
    u, shape = make_velocity("conv", torch.float64)
    u = u.to(DEVICE)
    x0 = randn(2, *shape, dtype=torch.float64)
    cot = randn(2, *shape, dtype=torch.float64)
    res = {}
    for backend in ("torch", "triton"):
        x = x0.clone().requires_grad_()
        x1 = dflow_fast.solve(u, x, steps=3, solver=solver, gradient=gradient, params=[],
                              backend=backend,
                              coupling=None if solver == "reversible_heun" else 0.8)
        gx, = torch.autograd.grad(x1, x, cot)
        res[backend] = (x1.detach(), gx)
    assert rel_err(res["triton"][0], res["torch"][0]) <= 1e-12
    assert rel_err(res["triton"][1], res["torch"][1]) <= 1e-12
