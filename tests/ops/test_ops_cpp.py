"""The compiled core's C++ CPU kernels (``torch.ops.dflow_fast.*``, backend "cpp") against their
PyTorch twins in ``dflow_fast.ops.twins`` evaluated in float64 (docs/design.md section 5).

fp16/bf16 tolerances are relative to PyTorch's own error at that precision (the same formula in
plain torch ops at that dtype): ``err <= 2 * err_torch_lowp + eps``. A missing extension fails
this module, unless ``DFLOW_FAST_NO_EXT=1`` says the installation is pure Python on purpose.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import dflow_fast
from dflow_fast.ops import twins as ref
from dflow_fast.ops import registry as backends
from dflow_fast.core.plan import REVERSIBLE

from tests.helpers import make_velocity, rel_err

try:
    from dflow_fast import _C
    from dflow_fast.ops import ext as _ext
except ImportError as e:
    if os.environ.get("DFLOW_FAST_NO_EXT") == "1":
        pytest.skip(f"dflow_fast._C not built (DFLOW_FAST_NO_EXT=1, pure-Python install): {e}",
                    allow_module_level=True)
    pytest.fail(f"dflow_fast._C does not import ({e}). Build it with `pip install "
                f"--no-build-isolation -e .`, or set DFLOW_FAST_NO_EXT=1 for a pure-Python "
                f"install.", pytrace=False)

ops = torch.ops.dflow_fast
LOW = (torch.float16, torch.bfloat16)
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
#: rel-error bounds against float64 (docs/design.md section 5); fp16/bf16 are bounded relative to torch
TOL = {"elementwise": {torch.float32: 1e-6, torch.float64: 1e-15},
       "chi_prior": {torch.float32: 1e-6, torch.float64: 1e-14},
       "lbfgs": {torch.float32: 1e-5, torch.float64: 1e-12}}
LOWP_EPS = 1e-6

# numel 1, 7, 1023, 4097 (odd: exercises the remainder of every chunked loop), and an image batch
SHAPES = [(1,), (7,), (3, 341), (17, 241), (2, 3, 5, 7)]
CHI_SHAPES = [(1, 1), (1, 7), (3, 1023), (2, 4097), (7, 33)]
LBFGS_CASES = [(1, 1, 1, 0), (1, 3, 7, 0), (4, 10, 1023, 0), (2, 5, 4097, 0), (3, 0, 7, 0),
               (5, 6, 33, 3)]  # (B, m, D, leading empty history slots)


def _id(v):
    if isinstance(v, torch.dtype):
        return str(v).removeprefix("torch.")
    if isinstance(v, tuple):
        return "x".join(map(str, v))
    return str(v)


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


def check(out, want64, torch_lowp, dtype, kind, scale=None):
    """out (dtype) vs the float64 truth, error relative to ||truth|| (or to `scale`); at fp16/bf16
    bounded by twice torch's own error at that precision."""
    def err_of(t):
        diff = float((t.double() - want64).norm())
        return diff / (float(want64.norm()) if scale is None else scale)
    err = err_of(out)
    if dtype in LOW and not bool(torch.isfinite(torch_lowp).all()):
        # torch's own low-precision result overflowed (fp16 tops out at 65504, e.g. chi_prior's
        # value for D = 2^18): the fused op keeps such statistics in float32, so hold it to the
        # float32 tolerance instead.
        bound = TOL[kind][torch.float32]
    else:
        bound = 2 * err_of(torch_lowp) + LOWP_EPS if dtype in LOW else TOL[kind][dtype]
    assert err <= bound, f"{kind} {dtype}: rel err {err:.3g} > {bound:.3g}"


def up(*ts):
    return [t.double() for t in ts]


# ---- elementwise ops ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_axpy(shape, dtype):
    x, v = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype)
    out = ops.axpy(x, v, -0.37)
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
    check(out, ref.axpy(*up(x, v), -0.37), x + -0.37 * v, dtype, "elementwise")


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_adjoint_euler(shape, dtype):
    a, w = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype)
    out = ops.adjoint_euler(a, w)
    assert out.shape == a.shape and out.dtype == dtype
    check(out, ref.adjoint_euler(*up(a, w)), a + w, dtype, "elementwise")


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_adjoint_midpoint(shape, dtype):
    a, w2, w1 = (randn(*shape, dtype=dtype) for _ in range(3))
    out = ops.adjoint_midpoint(a, w2, w1)
    assert out.shape == a.shape and out.dtype == dtype
    check(out, ref.adjoint_midpoint(*up(a, w2, w1)), a + w2 + w1, dtype, "elementwise")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=_id)
def test_elementwise_match_reference_bitwise(dtype):
    """Same association and one rounding per element: fp32/fp64 results equal the twins'."""
    a, w2, w1 = (randn(5, 4097, dtype=dtype) for _ in range(3))
    assert torch.equal(ops.adjoint_midpoint(a, w2, w1), ref.adjoint_midpoint(a, w2, w1))
    assert torch.equal(ops.adjoint_euler(a, w1), ref.adjoint_euler(a, w1))


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_elementwise_noncontiguous(dtype):
    base = randn(6, 9, 4, dtype=dtype)
    x = base.transpose(0, 2)  # [4, 9, 6], transposed
    v = randn(4, 18, 6, dtype=dtype)[:, ::2]  # strided
    w = randn(4, 1, 6, dtype=dtype).expand(4, 9, 6)  # stride 0
    assert not (x.is_contiguous() or v.is_contiguous() or w.is_contiguous())
    check(ops.axpy(x, v, 0.5), ref.axpy(*up(x, v), 0.5), x + 0.5 * v, dtype, "elementwise")
    check(ops.adjoint_euler(x, w), ref.adjoint_euler(*up(x, w)), x + w, dtype, "elementwise")
    check(ops.adjoint_midpoint(x, v, w), ref.adjoint_midpoint(*up(x, v, w)), x + v + w, dtype,
          "elementwise")


def test_elementwise_empty():
    x = torch.empty(0, 3)
    assert ops.axpy(x, x, 1.0).shape == (0, 3)
    assert ops.adjoint_midpoint(x, x, x).shape == (0, 3)


# ---- reversible solvers' state updates ---------------------------------------------------------

def _heun_step_native(y, yhat, f, fnext, h, hnext):
    y1 = y + (0.5 * h) * (f + fnext)
    return y1, 2 * y1 - yhat + hnext * fnext


def _heun_adjoint_native(a_y, a_yhat, w, h, hnext):
    c = a_yhat + w
    ay1 = a_y + 2 * c
    return ay1, -c, (0.5 * h) * a_y + h * c + (0.5 * hnext) * ay1


#: op name -> (number of tensor inputs, scalar arguments, the twin's formula in plain torch ops at
#: the inputs' own precision: the fp16/bf16 yardstick of `check`). The scalars are steps and
#: couplings as the solvers pass them (negative steps: the inverse sweep).
REVERSIBLE_OPS = {
    "heun_predict": (3, (-0.37,), lambda y, yh, f, h: 2 * y - yh + h * f),
    "heun_step": (4, (0.37, -0.21), _heun_step_native),
    "heun_adjoint": (3, (0.37, 0.21), _heun_adjoint_native),
    "coupled_forward": (3, (0.7, 0.37),
                        lambda y, z, v, lam, h: lam * y + (1 - lam) * z + h * v),
    "coupled_inverse": (3, (0.7, -0.37),
                        lambda y1, z, v, lam, h: (y1 - (1 - lam) * z - h * v) / lam),
    "coupled_adjoint": (3, (0.9, 0.37),
                        lambda a_z, b, w, lam, h: (lam * b, a_z + (1 - lam) * b + h * w)),
}


def as_tuple(t):
    return t if isinstance(t, tuple) else (t,)


def check_reversible_op(name, op, tensors):
    """op(*tensors, *scalars) (a compiled op) against the twin in float64, output by output."""
    _, scalars, native = REVERSIBLE_OPS[name]
    dtype = tensors[0].dtype
    outs = as_tuple(op(*tensors, *scalars))
    want = as_tuple(getattr(ref, name)(*up(*tensors), *scalars))
    lowp = as_tuple(native(*tensors, *scalars))
    assert len(outs) == len(want)
    for out, w, n in zip(outs, want, lowp):
        assert out.shape == tensors[0].shape and out.dtype == dtype and out.is_contiguous()
        check(out, w, n, dtype, "elementwise")


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("name", list(REVERSIBLE_OPS))
def test_reversible_op(name, dtype, shape):
    n_in = REVERSIBLE_OPS[name][0]
    check_reversible_op(name, getattr(ops, name), [randn(*shape, dtype=dtype)
                                                   for _ in range(n_in)])


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("name", list(REVERSIBLE_OPS))
def test_reversible_op_noncontiguous(name, dtype):
    views = [randn(6, 9, 4, dtype=dtype).transpose(0, 2),  # [4, 9, 6], transposed
             randn(4, 18, 6, dtype=dtype)[:, ::2],  # strided
             randn(4, 1, 6, dtype=dtype).expand(4, 9, 6),  # stride 0
             randn(4, 9, 6, dtype=dtype)]  # contiguous, next to the others
    assert not any(v.is_contiguous() for v in views[:3])
    n_in = REVERSIBLE_OPS[name][0]
    check_reversible_op(name, getattr(ops, name), views[:n_in])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=_id)
def test_reversible_ops_invert_each_other(dtype):
    """A step forward, then the same ops with negated steps, rebuild the start to rounding: the
    inverse sweep's contract (see test_reversible.py for the twins)."""
    y, yh, f, fn, z, v = (randn(5, 333, dtype=dtype) for _ in range(6))
    h, lam = 0.3, 0.7
    tol = TOL["elementwise"][dtype] * 10
    yh1 = ops.heun_predict(y, yh, f, h)
    y1, _ = ops.heun_step(y, yh1, f, fn, h, 0.0)
    assert rel_err(ops.heun_predict(y1, yh1, fn, -h), yh) <= tol
    assert rel_err(ops.heun_step(y1, yh, fn, f, -h, 0.0)[0], y) <= tol
    assert rel_err(ops.coupled_inverse(ops.coupled_forward(y, z, v, lam, h), z, v, lam, h),
                   y) <= tol


def test_reversible_ops_empty():
    x = torch.empty(0, 3)
    assert ops.heun_predict(x, x, x, 0.1).shape == (0, 3)
    assert [t.shape for t in ops.heun_step(x, x, x, x, 0.1, 0.2)] == [(0, 3)] * 2
    assert [t.shape for t in ops.heun_adjoint(x, x, x, 0.1, 0.2)] == [(0, 3)] * 3
    assert ops.coupled_inverse(x, x, x, 0.5, 0.1).shape == (0, 3)
    assert [t.shape for t in ops.coupled_adjoint(x, x, x, 0.5, 0.1)] == [(0, 3)] * 2


# ---- chi_prior ---------------------------------------------------------------------------------

def _chi_prior_native(x, weight):
    """The reference formula in plain torch ops at x's own precision (no upcast)."""
    d = x.shape[1]
    sq = (x * x).sum(1)
    value = weight * (0.5 * sq - 0.5 * (d - 1) * torch.log(sq))
    return sq, value, (weight * (1.0 - (d - 1) / sq))[:, None] * x


def _check_chi_prior(x, weight):
    dtype = x.dtype
    sq, value, grad = ops.chi_prior(x, weight)
    stat = torch.float32 if dtype in LOW else dtype
    assert (sq.dtype, value.dtype, grad.dtype) == (stat, stat, dtype)
    assert sq.shape == value.shape == (x.shape[0],) and grad.shape == x.shape
    sq64, value64, grad64 = ref.chi_prior(x.double(), weight)
    sq_n, value_n, grad_n = _chi_prior_native(x, weight)
    check(sq, sq64, sq_n, dtype, "chi_prior")
    check(value, value64, value_n, dtype, "chi_prior")
    # grad = weight (1 - (D-1)/sq) x cancels for x on the typical shell (sq ~ D-1, where x ~ N(0, I)
    # lies): its error is measured against the size of the terms, ||weight x||, not of the result.
    check(grad, grad64, grad_n, dtype, "chi_prior", scale=float((weight * x.double()).norm()))


@pytest.mark.parametrize("shape", CHI_SHAPES, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_chi_prior(shape, dtype):
    _check_chi_prior(randn(*shape, dtype=dtype), 0.7)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_chi_prior_noncontiguous_and_off_shell(dtype):
    scale = torch.linspace(0.2, 3.0, 5, dtype=torch.float64).to(dtype)  # ||x|| off the shell
    x = (randn(300, 5, dtype=dtype) * scale).t()  # [5, 300], transposed
    assert not x.is_contiguous()
    _check_chi_prior(x, 0.3)
    _check_chi_prior(randn(4, 600, dtype=dtype)[:, ::3], 1.5)  # strided columns


# ---- lbfgs_direction ---------------------------------------------------------------------------

def lbfgs_inputs(B, m, D, empty=0, dtype=torch.float64):
    """Histories like the optimizer's: y ~ H s with H positive definite, so <y, s> > 0; the
    oldest `empty` slots are zero with rho = 0."""
    g = torch.randn(B, D, dtype=torch.float64)
    S = torch.randn(B, m, D, dtype=torch.float64)
    Y = S * (0.5 + torch.rand(B, 1, D, dtype=torch.float64)) \
        + 0.05 * torch.randn(B, m, D, dtype=torch.float64)
    rho = 1.0 / (Y * S).sum(-1)
    gamma = ((S[:, -1] * Y[:, -1]).sum(-1) / (Y[:, -1] ** 2).sum(-1) if m
             else 0.5 + torch.rand(B, dtype=torch.float64))
    S[:, :empty] = 0
    Y[:, :empty] = 0
    rho[:, :empty] = 0
    return [t.to(dtype) for t in (g, S, Y, rho, gamma)]


@pytest.mark.parametrize("case", LBFGS_CASES, ids=lambda c: "B{}-m{}-D{}-empty{}".format(*c))
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_lbfgs_direction(case, dtype):
    args = lbfgs_inputs(*case, dtype=dtype)
    out = ops.lbfgs_direction(*args)
    assert out.shape == args[0].shape and out.dtype == dtype
    want = ref.lbfgs_direction(*up(*args))
    check(out, want, ref.lbfgs_direction(*args), dtype, "lbfgs")


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_lbfgs_direction_noncontiguous(dtype):
    g, S, Y, rho, gamma = lbfgs_inputs(3, 4, 65, dtype=dtype)
    g_t = g.t().contiguous().t()  # column-major [B, D]
    S_p = S.permute(2, 0, 1).contiguous().permute(1, 2, 0)  # [B, m, D] over a [D, B, m] buffer
    Y_s = torch.stack([Y, Y], 3).flatten(2)[:, :, ::2]  # strided view equal to Y
    rho_t = rho.t().contiguous().t()
    assert not (g_t.is_contiguous() or S_p.is_contiguous() or Y_s.is_contiguous()
                or rho_t.is_contiguous())
    out = ops.lbfgs_direction(g_t, S_p, Y_s, rho_t, gamma)
    check(out, ref.lbfgs_direction(*up(g, S, Y, rho, gamma)),
          ref.lbfgs_direction(g, S, Y, rho, gamma), dtype, "lbfgs")


def test_results_do_not_depend_on_thread_count():
    x = randn(64, 1023)
    args = lbfgs_inputs(16, 6, 1023, dtype=torch.float32)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = (ops.chi_prior(x, 0.5), ops.lbfgs_direction(*args), ops.axpy(x, x, 0.1))
        torch.set_num_threads(max(2, n))
        many = (ops.chi_prior(x, 0.5), ops.lbfgs_direction(*args), ops.axpy(x, x, 0.1))
    finally:
        torch.set_num_threads(n)
    for a, b in zip(one[0] + one[1:], many[0] + many[1:]):
        assert torch.equal(a, b)


# ---- input checks ------------------------------------------------------------------------------

@pytest.mark.skipif(sys.platform != "linux" or shutil.which("readelf") is None,
                    reason="reads the ELF dynamic section with readelf (Linux)")
def test_extension_links_the_shared_cpp_runtime():
    """dflow_fast._C must take libstdc++ from the shared library the process already has: a static
    copy (a toolchain default seen on a GPU machine) crashed on the first TORCH_CHECK message."""
    from dflow_fast import _C
    out = subprocess.run(["readelf", "-d", _C.__file__], capture_output=True, text=True,
                         check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)
    assert any(n.startswith("libstdc++.so") for n in needed), needed


def test_bad_input_messages():
    x = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match=r"axpy: v must have the shape, dtype and device of x"):
        ops.axpy(x, torch.randn(2, 4), 1.0)
    with pytest.raises(RuntimeError, match=r"adjoint_midpoint: w1 .* float64"):
        ops.adjoint_midpoint(x, x, x.double())
    with pytest.raises(RuntimeError, match=r"axpy: x must be float32, float64, float16 or "
                                           r"bfloat16, got \[2, 3\] Int"):
        ops.axpy(x.int(), x.int(), 1.0)
    with pytest.raises(RuntimeError, match=r"chi_prior: x must be 2-D \[B, D\], got \[2, 3, 1\]"):
        ops.chi_prior(x[..., None], 1.0)
    g, S, Y, rho, gamma = lbfgs_inputs(2, 3, 5)
    with pytest.raises(RuntimeError, match=r"lbfgs_direction: rho must be \[B, m\] = \[2, 3\]"):
        ops.lbfgs_direction(g, S, Y, rho[:, :2], gamma)
    with pytest.raises(RuntimeError, match=r"lbfgs_direction: S must be \[B, m, D\]"):
        ops.lbfgs_direction(g, S[:, :, :4], Y, rho, gamma)
    with pytest.raises(RuntimeError, match=r"lbfgs_direction: gamma must have g's dtype"):
        ops.lbfgs_direction(g, S, Y, rho, gamma.float())
    with pytest.raises(RuntimeError, match=r"heun_step: fnext must have the shape, dtype and "
                                           r"device of y; y is \[2, 3\] float32 on cpu, fnext is "
                                           r"\[3, 2\] float32"):
        ops.heun_step(x, x, x, x.t(), 0.1, 0.2)
    with pytest.raises(RuntimeError, match=r"heun_adjoint: w .* float16"):
        ops.heun_adjoint(x, x, x.half(), 0.1, 0.2)
    with pytest.raises(RuntimeError, match=r"coupled_adjoint: a_z must be float32, float64, "
                                           r"float16 or bfloat16"):
        ops.coupled_adjoint(x.long(), x.long(), x.long(), 0.5, 0.1)
    with pytest.raises(RuntimeError, match=r"coupled_inverse: lam must be nonzero"):
        ops.coupled_inverse(x, x, x, 0.0, 0.1)
    with pytest.raises(RuntimeError, match=r"coupled_forward: v must have the shape"):
        ops.coupled_forward(x, x, x[:1], 0.5, 0.1)


# ---- torch.library integration: opcheck, autograd, torch.compile -------------------------------

def _opcheck_samples(dtype):
    x, v = randn(3, 2, 5, dtype=dtype), randn(3, 2, 5, dtype=dtype)
    return [
        (ops.axpy.default, (x, v, 0.25)),
        (ops.axpy.default, (x.clone().requires_grad_(), v.clone().requires_grad_(), -1.5)),
        (ops.adjoint_euler.default, (x, v)),
        (ops.adjoint_euler.default, (x.clone().requires_grad_(), v)),
        (ops.adjoint_midpoint.default, (x, v, x.transpose(1, 2).contiguous().transpose(1, 2))),
        (ops.adjoint_midpoint.default, (x.clone().requires_grad_(), v, x)),
        (ops.chi_prior.default, (randn(4, 9, dtype=dtype), 0.1)),
        (ops.chi_prior.default, (randn(4, 9, dtype=dtype).requires_grad_(), 0.1)),
        (ops.lbfgs_direction.default, tuple(lbfgs_inputs(2, 3, 9, empty=1, dtype=dtype))),
    ] + _reversible_opcheck_samples(dtype)


def _reversible_opcheck_samples(dtype):
    """Each reversible op plain, with every input requiring grad, and on a non-contiguous view."""
    out = []
    for name, (n_in, scalars, _) in REVERSIBLE_OPS.items():
        op = getattr(ops, name).default
        ts = [randn(3, 2, 5, dtype=dtype) for _ in range(n_in)]
        out.append((op, (*ts, *scalars)))
        out.append((op, (*[t.clone().requires_grad_() for t in ts], *scalars)))
        out.append((op, (ts[0].transpose(1, 2).contiguous().transpose(1, 2), *ts[1:], *scalars)))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=_id)
def test_opcheck(dtype):
    for op, args in _opcheck_samples(dtype):
        torch.library.opcheck(op, args)


def test_gradcheck():
    x, v, w = (randn(2, 3, dtype=torch.float64).requires_grad_() for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b: ops.axpy(a, b, 0.7), (x, v))
    assert torch.autograd.gradcheck(ops.adjoint_euler, (x, v))
    assert torch.autograd.gradcheck(ops.adjoint_midpoint, (x, v, w))
    xc = randn(3, 6, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: ops.chi_prior(a, 0.3), (xc,))
    assert torch.autograd.gradgradcheck(lambda a: ops.chi_prior(a, 0.3), (xc,))


@pytest.mark.parametrize("name", list(REVERSIBLE_OPS))
def test_reversible_op_gradcheck(name):
    n_in, scalars, _ = REVERSIBLE_OPS[name]
    ts = [randn(2, 3, dtype=torch.float64).requires_grad_() for _ in range(n_in)]
    fn = lambda *a: getattr(ops, name)(*a, *scalars)  # noqa: E731
    assert torch.autograd.gradcheck(fn, ts)
    assert torch.autograd.gradgradcheck(fn, ts)


@pytest.mark.parametrize("used", ["all", "first", "last"])
@pytest.mark.parametrize("name", [n for n in REVERSIBLE_OPS if n in ("heun_step", "heun_adjoint",
                                                                      "coupled_adjoint")])
def test_reversible_op_backward_matches_reference(name, used):
    """Multi-output ops: the backward sums every used output's cotangent; an unused output (its
    cotangent None, like heun_step's prediction at the last step) contributes nothing."""
    n_in, scalars, _ = REVERSIBLE_OPS[name]
    xs = [randn(4, 7, dtype=torch.float64) for _ in range(n_in)]
    grads = []
    for fn in (getattr(ops, name), getattr(ref, name)):
        leaves = [x.clone().requires_grad_() for x in xs]
        outs = fn(*leaves, *scalars)
        keep = {"all": outs, "first": outs[:1], "last": outs[-1:]}[used]
        torch.manual_seed(7)  # the same cotangents for both
        torch.autograd.backward(keep, [torch.randn_like(o) for o in keep])
        grads.append([leaf.grad for leaf in leaves])
    for a, b in zip(*grads):
        assert (a is None) == (b is None)  # an input no used output depends on gets no gradient
        if b is not None:
            assert rel_err(a, b) <= 1e-15


@pytest.mark.parametrize("name", list(REVERSIBLE_OPS))
def test_reversible_op_backward_low_precision(name):
    """bf16 cotangents: the backward combines them in fp32 and rounds once."""
    n_in, scalars, _ = REVERSIBLE_OPS[name]
    xs = [randn(3, 50, dtype=torch.bfloat16).requires_grad_() for _ in range(n_in)]
    outs = as_tuple(getattr(ops, name)(*xs, *scalars))
    cots = [randn(3, 50, dtype=torch.bfloat16) for _ in outs]
    torch.autograd.backward(outs, cots)
    x64 = [x.detach().double().requires_grad_() for x in xs]
    torch.autograd.backward(as_tuple(getattr(ref, name)(*x64, *scalars)),
                            [c.double() for c in cots])
    for x, w in zip(xs, x64):
        assert x.grad.dtype == torch.bfloat16
        assert rel_err(x.grad, w.grad) <= 2 ** -8  # one bf16 rounding: half an ulp


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
def test_chi_prior_backward_low_precision(dtype):
    x = randn(3, 50, dtype=dtype).requires_grad_()
    sq, value, _ = ops.chi_prior(x, 0.4)
    (2 * value.sum() + sq.sum()).backward()
    x64 = x.detach().double().requires_grad_()
    sq64, value64, _ = ref.chi_prior(x64, 0.4)
    (2 * value64.sum() + sq64.sum()).backward()
    assert x.grad.dtype == dtype
    bound = 1e-6 if dtype == torch.float32 else 2 ** -7
    assert rel_err(x.grad, x64.grad) <= bound


def test_chi_prior_backward_matches_reference():
    """Cotangents on all three outputs, the grad output's (a Hessian-vector product) included,
    give the gradient autograd computes through the torch twin."""
    x = randn(4, 37, dtype=torch.float64)
    cots = (randn(4, dtype=torch.float64), randn(4, dtype=torch.float64),
            randn(4, 37, dtype=torch.float64))
    grads = []
    for fn in (ops.chi_prior, ref.chi_prior):
        xg = x.clone().requires_grad_()
        torch.autograd.backward(fn(xg, 0.6), cots)
        grads.append(xg.grad)
    assert rel_err(grads[0], grads[1]) <= 1e-13


def test_lbfgs_direction_not_differentiable():
    g, S, Y, rho, gamma = lbfgs_inputs(2, 3, 5)
    d = ops.lbfgs_direction(g.requires_grad_(), S, Y, rho, gamma)
    with pytest.raises(RuntimeError, match="lbfgs_direction is not differentiable"):
        d.sum().backward()


def _pipeline(x, v, w, hist):
    """One Euler step, a midpoint adjoint accumulation, the prior and an L-BFGS direction."""
    y = ops.axpy(x, v, 0.25)
    a = ops.adjoint_midpoint(y, w, x)
    flat = a.flatten(1)
    sq, value, grad = ops.chi_prior(flat, 0.1)
    d = ops.lbfgs_direction(grad.detach(), *hist)
    return ops.adjoint_euler(flat, d) * value[:, None] + sq[:, None] + grad


def test_torch_compile_fullgraph():
    # aot_eager traces the ops through their fake kernels and autograd formulas into one graph,
    # which is what torch.compile needs of them; inductor adds code generation for the plain torch
    # ops around them (and about 30 s of compile time on a 2-core runner).
    torch._dynamo.reset()
    x, v, w = (randn(3, 2, 4, dtype=torch.float64) for _ in range(3))
    hist = lbfgs_inputs(3, 4, 8, empty=1)[1:]  # S, Y, rho, gamma
    eager = _pipeline(x, v, w, hist)
    compiled = torch.compile(_pipeline, fullgraph=True, backend="aot_eager")
    assert rel_err(compiled(x, v, w, hist), eager) <= 1e-14
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    _pipeline(xe, v, w, hist).sum().backward()
    compiled(xc, v, w, hist).sum().backward()
    assert rel_err(xc.grad, xe.grad) <= 1e-13


# ---- the extension module, build facts, and backend "cpp" end to end ---------------------------

def test_pybind_functions_match_torch_ops():
    x, v = randn(4, 7), randn(4, 7)
    assert torch.equal(_C.axpy(x, v, 0.3), ops.axpy(x, v, 0.3))
    assert torch.equal(_C.adjoint_midpoint(x, v, x), ops.adjoint_midpoint(x, v, x))
    for a, b in zip(_C.chi_prior(x, 0.2), ops.chi_prior(x, 0.2)):
        assert torch.equal(a, b)
    args = lbfgs_inputs(2, 3, 7, dtype=torch.float32)
    assert torch.equal(_C.lbfgs_direction(*args), ops.lbfgs_direction(*args))
    for name, (n_in, scalars, _) in REVERSIBLE_OPS.items():
        ts = [randn(4, 7) for _ in range(n_in)]
        for a, b in zip(as_tuple(getattr(_C, name)(*ts, *scalars)),
                        as_tuple(getattr(ops, name)(*ts, *scalars))):
            assert torch.equal(a, b), name


def test_build_info_reports_cpp():
    info = dflow_fast.build_info()
    assert info["cpp"] and "cpp" in info["backends"]
    assert info["cuda"] == ("cuda" in info["backends"]) == _ext.has_cuda()
    assert info["built_with_torch"] == torch.__version__.split("+")[0]
    if sys.platform == "linux":
        assert info["openmp"], "CPU kernels built without OpenMP run on one thread"
    if not _ext.has_cuda():
        assert info["cuda_archs"] == []


def test_import_compiles_and_loads_nothing():
    code = ("import sys, dflow_fast; "
            "assert 'dflow_fast._C' not in sys.modules, 'extension loaded at import'; "
            "assert 'triton' not in sys.modules, 'triton imported at import'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("gradient", ["adjoint", "backprop"])
@pytest.mark.parametrize("solver", ["euler", "midpoint"])
@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_solve_gradient_matches_torch(kind, solver, gradient):
    u, shape = make_velocity(kind, torch.float64)
    x0 = randn(3, *shape, dtype=torch.float64)
    cot = randn(3, *shape, dtype=torch.float64)
    res = {}
    for backend in ("torch", "cpp"):
        u.zero_grad()
        x = x0.clone().requires_grad_()
        x1 = dflow_fast.solve(u, x, steps=4, solver=solver, gradient=gradient, backend=backend)
        (x1 * cot).sum().backward()
        res[backend] = (x1.detach(), x.grad, [p.grad.clone() for p in u.parameters()])
    (x1c, gxc, gpc), (x1t, gxt, gpt) = res["cpp"], res["torch"]
    assert rel_err(x1c, x1t) <= 1e-12
    assert rel_err(gxc, gxt) <= 1e-12
    for a, b in zip(gpc, gpt):
        assert rel_err(a, b) <= 1e-12


def test_optimize_matches_torch():
    u, shape = make_velocity("mlp", torch.float64)
    u.requires_grad_(False)
    x0 = randn(3, *shape, dtype=torch.float64)
    target = randn(3, *shape, dtype=torch.float64)

    def cost(x1):
        return ((x1 - target) ** 2).sum(1)

    out = {b: dflow_fast.optimize(u, cost, x0, steps=3, solver="midpoint", max_iter=8,
                                  history_size=4, regularization=dflow_fast.ChiPrior(0.1),
                                  backend=b)
           for b in ("torch", "cpp")}
    a, b = out["cpp"], out["torch"]
    assert a.status == b.status and a.nit.tolist() == b.nit.tolist()
    assert int(a.nit.min()) >= 2  # the two-loop recursion ran with a history
    assert rel_err(a.x0, b.x0) <= 1e-10
    assert rel_err(a.loss, b.loss) <= 1e-10


@pytest.mark.parametrize("gradient", ["reversible", "backprop", "adjoint"])
@pytest.mark.parametrize("solver", REVERSIBLE)
@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_reversible_solve_gradient_matches_torch(kind, solver, gradient):
    """The reversible solvers with the cpp kernels for their state updates: x1 and every gradient
    as with backend="torch" (the twins)."""
    u, shape = make_velocity(kind, torch.float64)
    x0 = randn(3, *shape, dtype=torch.float64)
    cot = randn(3, *shape, dtype=torch.float64)
    assert backends.load("cpp").fallbacks == ()
    res = {}
    for backend in ("torch", "cpp"):
        u.zero_grad()
        x = x0.clone().requires_grad_()
        x1 = dflow_fast.solve(u, x, steps=4, solver=solver, gradient=gradient, backend=backend,
                              coupling=None if solver == "reversible_heun" else 0.8)
        (x1 * cot).sum().backward()
        res[backend] = (x1.detach(), x.grad, [p.grad.clone() for p in u.parameters()])
    (x1c, gxc, gpc), (x1t, gxt, gpt) = res["cpp"], res["torch"]
    assert rel_err(x1c, x1t) <= 1e-12
    assert rel_err(gxc, gxt) <= 1e-12
    for a, b in zip(gpc, gpt):
        assert b.norm() > 0 and rel_err(a, b) <= 1e-12
