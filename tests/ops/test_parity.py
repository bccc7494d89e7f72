"""Every fused op on every backend against its PyTorch twin (docs/design.md sections 4 and 5).

Per op x backend x dtype: the op's outputs, and its inputs' gradients through the registered
autograd formula (the twin's own autograd for backend "torch"), against the twin evaluated in
float64, on fresh random inputs (never zeros) at sizes that exercise tails and remainders, and on
transposed, strided, broadcast and misaligned views. Then, per backend: torch.library.opcheck,
gradcheck, the backward with unused outputs, the input checks' messages, and solve/optimize
against backend="torch".

Backends run where common.DEVICE says: "torch" and "cpp" on the CPU, "cuda" on a CUDA device,
"triton" on a CUDA device or else on the CPU under TRITON_INTERPRET=1 (set by tests.ops.common).
One that cannot run here skips, saying why. Test ids read op-backend-dtype-case, so that
``-k cuda`` selects one backend.
"""
from __future__ import annotations

import math
import re

import pytest
import torch

import dflow_fast
from dflow_fast.core.plan import REVERSIBLE
from dflow_fast.ops import registry, twins
from tests.helpers import make_velocity, rel_err
from tests.ops.common import (COMPILED, DEVICE, DTYPES, LOW, OPS, LbfgsCase, as_tuple, grid,
                              lbfgs_inputs, load, randn)

# ---- the tolerance scheme: one for every backend --------------------------------------------
#
# err = ||out - ref|| / scale, computed in float64. ref: the twin evaluated in float64 on the same
# (rounded) inputs; for gradients, autograd through that twin with the same cotangents.
# scale = max(||ref||, ||T||), T the elementwise largest of the terms the op adds up (`terms`):
# one element of lam y + (1 - lam) z + h v can cancel to near 0, and then neither a kernel nor
# the twin itself has relative accuracy to speak of (against ||ref|| alone, about 1% of 1-element
# draws failed the float32 bound with a correct kernel, in outputs and in gradients alike).
#
#   dtype      elementwise   reduction (chi_prior)   lbfgs_direction
#   float64    1e-15         1e-14                   1e-12
#   float32    1e-6          1e-6                    1e-5
#   fp16/bf16  err <= 2 err_twin + 1e-5   (err_twin: the twin's own error at that dtype)
#
# float64/float32: the fixed bounds of the former C++ kernel tests (test_ops_cpp.py); measured
# here (cpp, torch, triton on the interpreter), outputs and gradients: float64 <= 3.8e-16,
# float32 <= 1.4e-7. fp16/bf16: the flash-attention rule of the former Triton tests, with their
# eps 1e-5: twice the twin's own error at that dtype (the twin computes in fp32 and rounds once,
# like the kernels) plus eps. The C++ tests' eps, 1e-6, is too small against that yardstick:
# chi_prior's fp32 statistics of bf16 input come out of the C++ kernel 1.06e-6 above twice the
# twin's error (D = 4097). Triton's bf16 runs on CUDA only: the interpreter truncates fp32 -> bf16
# casts instead of rounding them.
TOL = {"elementwise": {torch.float64: 1e-15, torch.float32: 1e-6},
       "reduction": {torch.float64: 1e-14, torch.float32: 1e-6},
       "lbfgs": {torch.float64: 1e-12, torch.float32: 1e-5}}
LOWP_FACTOR = 2
LOWP_EPS = 1e-5

BACKENDS = ("torch",) + COMPILED
ELEMENTWISE = [n for n, op in OPS.items() if op.kind == "elementwise"]
DIFFERENTIABLE = [n for n, op in OPS.items() if op.differentiable]
# numel 1, 7, 1023, 4097 (odd: the remainder of every vectorized or blocked loop), an image batch
SHAPES = [(1,), (7,), (3, 341), (1, 1023), (17, 241), (1, 4097), (2, 3, 5, 7)]
CHI_SHAPES = [(1, 1), (1, 7), (3, 1023), (2, 4097), (7, 33)]
LBFGS_CASES = [LbfgsCase(*c) for c in [
    (1, 0, 7), (3, 0, 7),  # no history: d = -gamma g
    (1, 1, 1), (3, 1, 1), (1, 3, 7), (1, 3, 1023),  # batch of one, D of one
    (4, 10, 257), (4, 10, 1023),  # the optimizer's default m
    (2, 5, 4097), (3, 4, 1023, 1), (5, 6, 33, 3), (2, 5, 4097, 3),  # partly empty histories
    (2, 3, 300, 3)]]  # every slot empty
#: on a GPU also sizes that fill it
GPU_CASES = {"elementwise": [(3, 1 << 20), (5, 12345)], "reduction": [(4, 1 << 18)],
             "lbfgs": [LbfgsCase(8, 10, 1 << 16, 2)]}


def cases(name, backend, dtype=None):
    kind = OPS[name].kind
    base = {"elementwise": SHAPES, "reduction": CHI_SHAPES, "lbfgs": LBFGS_CASES}[kind]
    return base + (GPU_CASES[kind] if DEVICE[backend] == "cuda" else [])


def setup(backend, dtype=None) -> str:
    """The device the backend runs on here; a skip when it cannot run, or not at this dtype."""
    load(backend)
    if backend == "triton" and DEVICE["triton"] == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter truncates fp32 -> bf16 casts instead of rounding to "
                    "nearest as GPUs do: Triton's bf16 is compared on CUDA only")
    return DEVICE[backend]


@pytest.fixture(autouse=True)
def _one_thread_for_the_interpreter(request):
    # The interpreter's tensors are tiny: torch's intra-op threads only add contention (the
    # optimize test took 3x longer with 2 threads than with 1).
    callspec = getattr(request.node, "callspec", None)
    if callspec is None or callspec.params.get("backend") != "triton" \
            or DEVICE["triton"] != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- the check ------------------------------------------------------------------------------

def terms(name, x64, scalars) -> list[list[torch.Tensor]]:
    """Per output of the op at float64 inputs, the terms it adds up (none: judged against the
    result alone)."""
    op, fn = OPS[name], getattr(twins, name)
    if op.kind == "elementwise":  # linear in its tensors: term i is the op on tensor i alone
        alone = [as_tuple(fn(*[t if j == i else torch.zeros_like(t) for j, t in enumerate(x64)],
                             *scalars)) for i in range(len(x64))]
        return [list(outs) for outs in zip(*alone)]
    if name == "chi_prior":
        (x,), (w,) = x64, scalars
        d, sq = x.shape[1], (x * x).sum(1)
        return [[sq], [0.5 * w * sq, 0.5 * w * (d - 1) * torch.log(sq)],
                [w * x, (w * (d - 1) / sq)[:, None] * x]]
    return [[]]


def vjp(outs, leaves, cots):
    """Input gradients for the cotangents of the used outputs (None: unused); None for an input
    no used output depends on."""
    used = [(o, c.to(o.dtype)) for o, c in zip(outs, cots) if c is not None]
    return torch.autograd.grad([o for o, _ in used], leaves, [c for _, c in used],
                               retain_graph=True, allow_unused=True)


class Twin:
    """The twin on copies of ``tensors`` (their dtype): outputs, gradients, and the terms each
    one adds up."""

    def __init__(self, name, tensors, scalars):
        self.name, self.scalars = name, scalars
        self.leaves = [t.detach().clone().requires_grad_(OPS[name].differentiable)
                       for t in tensors]
        self.outs = as_tuple(getattr(twins, name)(*self.leaves, *scalars))

    def output_terms(self):
        return terms(self.name, [t.detach() for t in self.leaves], self.scalars)

    def gradients(self, cots):
        """(input gradients, per input the gradient terms: one per used output)."""
        per_output = [vjp(self.outs, self.leaves, [c if j == k else None
                                                   for j, c in enumerate(cots)])
                      for k in range(len(cots)) if cots[k] is not None]
        return (vjp(self.outs, self.leaves, cots),
                [[g[i] for g in per_output if g[i] is not None] for i in range(len(self.leaves))])


def compare(what, got, want, same, dtype, kind, terms_=()):
    """``got`` against the float64 ``want`` by the scheme at the top; ``same`` is the twin's result
    at the tested ``dtype``, the yardstick at fp16/bf16. NaN fails every comparison."""
    assert bool(torch.isfinite(want).all()), f"{what}: the float64 reference is not finite"
    scale = float(want.norm())
    if terms_:
        scale = max(scale, float(torch.stack([t.abs() for t in terms_]).amax(0).norm()))
    assert scale > 0, f"{what}: reference and terms all zero"

    def err_of(t):
        return float((t.detach().double() - want).norm()) / scale

    err = err_of(got)
    if dtype in LOW:
        err_twin = err_of(same)
        assert math.isfinite(err_twin), f"{what}: the twin's own {dtype} result is not finite"
        bound = LOWP_FACTOR * err_twin + LOWP_EPS
    else:
        bound = TOL[kind][dtype]
    assert err <= bound, f"{what} at {dtype}: rel err {err:.3g} > {bound:.3g}"


def check_op(backend, name, inputs, scalars=None):
    """The backend's op against its twin: outputs, then (differentiable ops) gradients."""
    op = OPS[name]
    scalars = op.scalars if scalars is None else scalars
    dtype = inputs[0].dtype
    before = [t.clone() for t in inputs]
    outs = as_tuple(getattr(load(backend), name)(*inputs, *scalars))
    assert all(torch.equal(t, b) for t, b in zip(inputs, before)), f"{name} wrote to an input"
    ref = Twin(name, [t.double() for t in inputs], scalars)
    same = Twin(name, inputs, scalars)
    assert len(outs) == len(same.outs) == op.n_out
    for k, (out, want, s, t) in enumerate(zip(outs, ref.outs, same.outs, ref.output_terms())):
        assert (out.shape, out.dtype, out.device) == (s.shape, s.dtype, inputs[0].device), k
        assert out.is_contiguous() or backend == "torch", f"{name} output {k} not contiguous"
        compare(f"{name} output {k}", out, want.detach(), s.detach(), dtype, op.kind, t)
    if op.differentiable:
        check_gradients(backend, name, inputs, scalars, range(op.n_out))


def check_gradients(backend, name, inputs, scalars, used):
    """Gradients of the inputs for random cotangents on the outputs ``used`` (the others None, as
    for heun_step's prediction at the last step), against autograd through the twin."""
    op = OPS[name]
    dtype = inputs[0].dtype
    leaves = [t.detach().requires_grad_() for t in inputs]
    outs = as_tuple(getattr(load(backend), name)(*leaves, *scalars))
    cots = [randn(*o.shape, dtype=o.dtype, device=o.device) if k in used else None
            for k, o in enumerate(outs)]
    grads = vjp(outs, leaves, cots)
    want, want_terms = Twin(name, [t.double() for t in inputs], scalars).gradients(cots)
    same, _ = Twin(name, inputs, scalars).gradients(cots)
    for i, (g, w, s, t) in enumerate(zip(grads, want, same, want_terms)):
        # an input that no used output depends on gets no gradient, as through the twin
        assert (g is None) == (w is None), f"{name} gradient of input {i}: {g} vs {w}"
        if w is None:
            continue
        assert (g.shape, g.dtype) == (inputs[i].shape, dtype), i
        compare(f"{name} gradient of input {i}", g, w, s, dtype, op.kind, t)


# ---- parity: every op x backend x dtype x size ----------------------------------------------

@grid("name, backend, dtype, case", list(OPS), BACKENDS, DTYPES, cases)
def test_parity(name, backend, dtype, case):
    check_op(backend, name, OPS[name].inputs(case, dtype, setup(backend, dtype)))


def strided(t):
    """The same values in every other element of a buffer twice as wide, NaN in between (a kernel
    that reads them fails)."""
    view = torch.stack([t, torch.full_like(t, math.nan)], -1).flatten(-2)[..., ::2]
    assert torch.equal(view, t) and (not view.is_contiguous() or t.shape[-1] == 1)
    return view


def layouts(dtype, device, n):
    """Input lists for an n-input elementwise op: every input a view of another kind, in two
    orders, then all contiguous but the last, misaligned (vector loads must fall back)."""
    def view(kind):
        fresh = {"transposed": lambda: randn(67, 3, 5, dtype=dtype, device=device)
                 .permute(2, 1, 0),
                 "strided": lambda: strided(randn(5, 3, 67, dtype=dtype, device=device)),
                 "broadcast": lambda: randn(5, 1, 67, dtype=dtype, device=device)
                 .expand(5, 3, 67),  # stride 0
                 # storage offset 1: unaligned for vector loads
                 "misaligned": lambda: randn(5 * 3 * 67 + 1, dtype=dtype, device=device)[1:]
                 .view(5, 3, 67),
                 "contiguous": lambda: randn(5, 3, 67, dtype=dtype, device=device)}
        return fresh[kind]()
    kinds = ["transposed", "strided", "broadcast", "misaligned"]
    for order in (kinds, kinds[::-1], ["contiguous"] * (n - 1) + ["misaligned"]):
        yield [view(k) for k in order[:n]]


@grid("name, backend, dtype", ELEMENTWISE, BACKENDS, DTYPES)
def test_parity_noncontiguous(name, backend, dtype):
    device = setup(backend, dtype)
    for inputs in layouts(dtype, device, OPS[name].n_in):
        check_op(backend, name, inputs)


@grid("name, backend, dtype", ["chi_prior"], BACKENDS, DTYPES)
def test_parity_chi_prior_noncontiguous_and_off_shell(name, backend, dtype):
    device = setup(backend, dtype)
    scale = torch.linspace(0.2, 3.0, 5, dtype=torch.float64, device=device).to(dtype)
    x = (randn(300, 5, dtype=dtype, device=device) * scale).t()  # [5, 300], ||x|| off the shell
    assert not x.is_contiguous()
    check_op(backend, name, [x], (0.3,))
    check_op(backend, name, [randn(4, 600, dtype=dtype, device=device)[:, ::3]], (1.5,))


@grid("name, backend, dtype", ["lbfgs_direction"], BACKENDS, DTYPES)
def test_parity_lbfgs_direction_noncontiguous(name, backend, dtype):
    device = setup(backend, dtype)
    g, S, Y, rho, gamma = lbfgs_inputs(LbfgsCase(3, 4, 65), dtype, device)
    views = [g.t().contiguous().t(),  # column-major [B, D]
             S.permute(2, 0, 1).contiguous().permute(1, 2, 0),  # [B, m, D] over [D, B, m]
             strided(Y), rho.t().contiguous().t(), gamma]
    assert not any(v.is_contiguous() for v in views[:4])
    check_op(backend, name, views)
    g, S, Y, rho, gamma = lbfgs_inputs(LbfgsCase(3, 4, 513, 1), dtype, device)
    check_op(backend, name, [strided(g), S.transpose(0, 1).contiguous().transpose(0, 1),
                             strided(Y), rho, gamma])


#: float64 steps and couplings that float32 cannot hold (Triton passes Python floats to kernels as
#: fp32 scalars: its float64 kernels take each one as three fp32-exact parts)
EXACT_SCALARS = {"axpy": (1 / 3,), "heun_predict": (1 / 3,), "heun_step": (1 / 3, 1 / 7),
                 "heun_adjoint": (1 / 3, 1 / 7), "coupled_forward": (0.9, 1 / 3),
                 "coupled_inverse": (0.9, 1 / 3), "coupled_adjoint": (0.9, 1 / 3)}


@grid("name, backend", list(EXACT_SCALARS), BACKENDS)
def test_float64_scalars_are_not_rounded(name, backend):
    device = setup(backend)
    check_op(backend, name, OPS[name].inputs((4, 9), torch.float64, device), EXACT_SCALARS[name])


@grid("backend, dtype", COMPILED, (torch.float32, torch.float64))
def test_sums_equal_the_twins_bitwise(backend, dtype):
    """Same association and one rounding per element: fp32/fp64 sums equal the twins'."""
    device = setup(backend, dtype)
    ops = load(backend)
    a, w2, w1 = (randn(5, 4097, dtype=dtype, device=device) for _ in range(3))
    assert torch.equal(ops.adjoint_midpoint(a, w2, w1), twins.adjoint_midpoint(a, w2, w1))
    assert torch.equal(ops.adjoint_euler(a, w1), twins.adjoint_euler(a, w1))


@grid("backend, dtype", BACKENDS, (torch.float32, torch.float64))
def test_reversible_ops_invert_each_other(backend, dtype):
    """A step forward, then the same ops with negated steps, rebuild the start to rounding: the
    inverse sweep's contract (tests/gradients/test_reversible.py does it for the twins)."""
    device = setup(backend, dtype)
    ops = load(backend)
    y, yh, f, fn, z, v = (randn(5, 333, dtype=dtype, device=device) for _ in range(6))
    h, lam = 0.3, 0.7
    tol = TOL["elementwise"][dtype] * 10
    yh1 = ops.heun_predict(y, yh, f, h)
    y1, _ = ops.heun_step(y, yh1, f, fn, h, 0.0)
    assert rel_err(ops.heun_predict(y1, yh1, fn, -h), yh) <= tol
    assert rel_err(ops.heun_step(y1, yh, fn, f, -h, 0.0)[0], y) <= tol
    assert rel_err(ops.coupled_inverse(ops.coupled_forward(y, z, v, lam, h), z, v, lam, h),
                   y) <= tol


@grid("backend", BACKENDS)
def test_empty_inputs(backend):
    x = torch.empty(0, 3, device=setup(backend))
    ops = load(backend)
    for name in ELEMENTWISE:
        op = OPS[name]
        outs = as_tuple(getattr(ops, name)(*[x] * op.n_in, *op.scalars))
        assert [t.shape for t in outs] == [(0, 3)] * op.n_out, name


def test_cpp_results_do_not_depend_on_thread_count():
    ops = load("cpp")
    x = randn(64, 1023)
    args = lbfgs_inputs(LbfgsCase(16, 6, 1023), torch.float32)
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


@grid("name, backend", ["chi_prior"], ["triton"])
def test_parity_chi_prior_many_chunks(name, backend, monkeypatch):
    """A row split into several chunks of several blocks each (what D ~ 1e6 does with the
    defaults), exercised at small D by lowering the Triton kernel's chunk limit."""
    device = setup(backend)
    from dflow_fast.kernels import reductions
    monkeypatch.setattr(reductions, "MAX_CHUNKS", 2)
    assert reductions._chunks(9000) == (2, 3)
    check_op(backend, name, [randn(2, 9000, dtype=torch.float64, device=device)])


# ---- autograd: the registered formulas ------------------------------------------------------

def used_outputs(name, backend, dtype):
    n = OPS[name].n_out
    return ["all", "first", "last"] + (["all_but_last"] if n > 2 else [])


@grid("name, backend, dtype, used", [n for n in DIFFERENTIABLE if OPS[n].n_out > 1], COMPILED,
      (torch.float64, torch.float32, torch.bfloat16), used_outputs)
def test_backward_with_unused_outputs(name, backend, dtype, used):
    """Multi-output ops: the backward sums every used output's cotangent; an unused output (its
    cotangent None) contributes nothing, and an input only it depends on gets no gradient. At
    bf16 the cotangents are combined in fp32 and rounded once."""
    device = setup(backend, dtype)
    op = OPS[name]
    n = op.n_out
    ks = {"all": range(n), "first": [0], "last": [n - 1], "all_but_last": range(n - 1)}[used]
    shape = (4, 37) if name == "chi_prior" else (4, 7)
    check_gradients(backend, name, op.inputs(shape, dtype, device), op.scalars, ks)


@grid("name, backend", DIFFERENTIABLE, COMPILED)
def test_gradcheck(name, backend):
    """Finite differences agree with the formula, and with its own derivative (the formulas are
    torch ops, so twice differentiable)."""
    device = setup(backend)
    op = OPS[name]
    shape = (3, 6) if name == "chi_prior" else (2, 3)
    ts = [t.requires_grad_() for t in op.inputs(shape, torch.float64, device)]
    fn = getattr(load(backend), name)

    def f(*a):
        return fn(*a, *op.scalars)
    assert torch.autograd.gradcheck(f, ts)
    assert torch.autograd.gradgradcheck(f, ts)


@grid("backend", COMPILED)
def test_lbfgs_direction_not_differentiable(backend):
    device = setup(backend)
    g, S, Y, rho, gamma = lbfgs_inputs(LbfgsCase(2, 3, 5), torch.float64, device)
    d = load(backend).lbfgs_direction(g.requires_grad_(), S, Y, rho, gamma)
    with pytest.raises(RuntimeError, match="lbfgs_direction is not differentiable"):
        d.sum().backward()


#: the registered op of each compiled backend: torch.ops.<namespace>.<name>
NAMESPACE = {"cpp": "dflow_fast", "cuda": "dflow_fast", "triton": "dflow_fast_triton"}


def opcheck_samples(name, dtype, device):
    """Plain, every input requiring grad, and the first input a non-contiguous view."""
    op = OPS[name]
    if op.kind == "lbfgs":
        return [tuple(lbfgs_inputs(LbfgsCase(2, 3, 9, 1), dtype, device))]
    ts = op.inputs((4, 9) if name == "chi_prior" else (3, 2, 5), dtype, device)
    return [(*ts, *op.scalars),
            (*[t.clone().requires_grad_() for t in ts], *op.scalars),
            (ts[0].transpose(-1, -2).contiguous().transpose(-1, -2), *ts[1:], *op.scalars)]


@grid("name, backend, dtype", list(OPS), COMPILED, (torch.float32, torch.float64))
def test_opcheck(name, backend, dtype):
    """Schema, fake kernel, autograd registration and (compiled kernels) graph capture."""
    device = setup(backend, dtype)
    samples = opcheck_samples(name, dtype, device)
    getattr(load(backend), name)(*samples[0])  # registers the Triton op on its first call
    overload = getattr(getattr(torch.ops, NAMESPACE[backend]), name).default
    # An interpreted Triton kernel cannot be captured in a graph (test_aot_dispatch_*)
    kw = ({"test_utils": ("test_schema", "test_autograd_registration", "test_faketensor")}
          if backend == "triton" and device == "cpu" else {})
    for args in samples:
        torch.library.opcheck(overload, args, **kw)


# ---- input checks ---------------------------------------------------------------------------

#: bad call -> (the C++ checks' error, shared by "cpp" and "cuda" (csrc/ops.cpp); Triton's
#: (kernels/_common.py)), each (exception, message pattern; "{dev}" the inputs' device), or None
#: where that backend accepts the call
BAD_INPUTS = {
    "axpy-shape": (lambda o, x, lb: o.axpy(x, torch.cat([x, x[:, :1]], 1), 1.0),
                   (RuntimeError, r"axpy: v must have the shape, dtype and device of x"),
                   (ValueError, "shape")),
    "adjoint_euler-dtype": (lambda o, x, lb: o.adjoint_euler(x, x.double()),
                            (RuntimeError, r"adjoint_euler: w must have the shape, dtype and "
                                           r"device of a; .* float64"),
                            (ValueError, "dtype")),
    "adjoint_midpoint-dtype": (lambda o, x, lb: o.adjoint_midpoint(x, x, x.double()),
                               (RuntimeError, r"adjoint_midpoint: w1 .* float64"),
                               (ValueError, r"adjoint_midpoint: w1 must match a .*float64")),
    "adjoint_midpoint-shape": (lambda o, x, lb: o.adjoint_midpoint(x, x, x.t()),
                               (RuntimeError, r"adjoint_midpoint: w1 must have the shape"),
                               (ValueError, "w1")),
    "axpy-int": (lambda o, x, lb: o.axpy(x.int(), x.int(), 1.0),
                 (RuntimeError, r"axpy: x must be float32, float64, float16 or bfloat16, got "
                                r"\[2, 3\] Int"),
                 (TypeError, "dtype")),
    # the C++ ops' schema takes a 0-d tensor for a float (the dispatcher converts it)
    "axpy-tensor_step": (lambda o, x, lb: o.axpy(x, x, torch.tensor(0.1)),
                         None, (TypeError, "h")),
    "chi_prior-3d": (lambda o, x, lb: o.chi_prior(x[..., None], 1.0),
                     (RuntimeError, r"chi_prior: x must be 2-D \[B, D\], got \[2, 3, 1\]"),
                     (ValueError, r"\[B, D\]")),
    "lbfgs_direction-rho": (lambda o, x, lb: o.lbfgs_direction(*lb[:3], lb[3][:, :2], lb[4]),
                            (RuntimeError, r"lbfgs_direction: rho must be \[B, m\] = \[2, 3\]"),
                            (ValueError, "rho")),
    "lbfgs_direction-S": (lambda o, x, lb: o.lbfgs_direction(lb[0], lb[1][:, :, :4], *lb[2:]),
                          (RuntimeError, r"lbfgs_direction: S must be \[B, m, D\]"),
                          (ValueError, r"lbfgs_direction: expected g \[B, D\], S and Y "
                                       r"\[B, m, D\]")),
    "lbfgs_direction-gamma": (lambda o, x, lb: o.lbfgs_direction(*lb[:4], lb[4].float()),
                              (RuntimeError, r"lbfgs_direction: gamma must have g's dtype"),
                              (ValueError, "gamma")),
    "heun_step-shape": (lambda o, x, lb: o.heun_step(x, x, x, x.t(), 0.1, 0.2),
                        (RuntimeError, r"heun_step: fnext must have the shape, dtype and device "
                                       r"of y; y is \[2, 3\] float32 on {dev}, fnext is \[3, 2\] "
                                       r"float32"),
                        (ValueError, "heun_step: fnext must match y in shape")),
    "heun_adjoint-dtype": (lambda o, x, lb: o.heun_adjoint(x, x, x.half(), 0.1, 0.2),
                           (RuntimeError, r"heun_adjoint: w .* float16"),
                           (ValueError, r"heun_adjoint: w must match a_y .*float16")),
    "heun_adjoint-tensor_step": (lambda o, x, lb: o.heun_adjoint(x, x, x, 0.1, torch.tensor(0.2)),
                                 None, (TypeError, "heun_adjoint: hnext must be a real number")),
    "coupled_adjoint-int": (lambda o, x, lb: o.coupled_adjoint(x.long(), x.long(), x.long(), 0.5,
                                                               0.1),
                            (RuntimeError, r"coupled_adjoint: a_z must be float32, float64, "
                                           r"float16 or bfloat16"),
                            (TypeError, r"coupled_adjoint: a_z has dtype torch.int64")),
    "coupled_adjoint-dtype": (lambda o, x, lb: o.coupled_adjoint(x, x, x.double(), 0.5, 0.1),
                              (RuntimeError, r"coupled_adjoint: w must have the shape, dtype and "
                                             r"device of a_z; .* float64"),
                              (ValueError, "coupled_adjoint: w must match a_z .*float64")),
    # non-finite scalars: refused by every compiled backend (the twins would return NaN/inf)
    "coupled_forward-nan": (lambda o, x, lb: o.coupled_forward(x, x, x, float("nan"), 0.1),
                            (RuntimeError, "coupled_forward: lam must be finite, got nan"),
                            (ValueError, "coupled_forward: lam must be finite")),
    "axpy-inf": (lambda o, x, lb: o.axpy(x, x, float("inf")),
                 (RuntimeError, "axpy: h must be finite, got inf"),
                 (ValueError, "axpy: h must be finite")),
    "heun_step-nan": (lambda o, x, lb: o.heun_step(x, x, x, x, 0.1, float("nan")),
                      (RuntimeError, "heun_step: hnext must be finite, got nan"),
                      (ValueError, "heun_step: hnext must be finite")),
    "chi_prior-inf": (lambda o, x, lb: o.chi_prior(x, float("-inf")),
                      (RuntimeError, "chi_prior: weight must be finite, got -inf"),
                      (ValueError, "chi_prior: weight must be finite")),
    "coupled_forward-shape": (lambda o, x, lb: o.coupled_forward(x, x, x[:1], 0.5, 0.1),
                              (RuntimeError, r"coupled_forward: v must have the shape"),
                              (ValueError, r"coupled_forward: v must match y in shape")),
    "coupled_inverse-zero": (lambda o, x, lb: o.coupled_inverse(x, x, x, 0.0, 0.1),
                             (RuntimeError, r"coupled_inverse: lam must be nonzero"),
                             (ValueError, r"coupled_inverse: lam must be nonzero")),
}


def expected_error(backend, case):
    return BAD_INPUTS[case][2 if backend == "triton" else 1]


@grid("backend, case", COMPILED,
      lambda backend: [c for c in BAD_INPUTS if expected_error(backend, c) is not None])
def test_bad_input(backend, case):
    device = setup(backend)
    exc, pattern = expected_error(backend, case)
    x = randn(2, 3, device=device)
    lb = lbfgs_inputs(LbfgsCase(2, 3, 5), torch.float64, device)
    with pytest.raises(exc, match=pattern.format(dev=re.escape(str(x.device)))):
        BAD_INPUTS[case][0](load(backend), x, lb)


# ---- through the library: each backend against backend="torch" ------------------------------

@grid("backend", BACKENDS)
def test_backend_loads(backend):
    """Its own kernel for every op (no twin substituted), and "auto"-free resolution by name."""
    device = setup(backend)
    ops = load(backend)
    from dflow_fast import kernels
    home = {"torch": twins, "cpp": torch.ops.dflow_fast, "cuda": torch.ops.dflow_fast,
            "triton": kernels}[backend]
    assert ops.name == backend and ops.fallbacks == ()
    for name in OPS:
        assert getattr(ops, name) is getattr(home, name), name
    assert registry.resolve(backend, torch.device(device)).name == backend


def solve_both(backend, kind, **kw):
    """x1 and the gradients of x0 and of the velocity's parameters, with ``backend`` and with
    "torch", for one random cotangent."""
    device = setup(backend)
    u, shape = make_velocity(kind, torch.float64)
    u = u.to(device)
    x0 = randn(3, *shape, dtype=torch.float64, device=device)
    cot = randn(3, *shape, dtype=torch.float64, device=device)
    res = {}
    for b in (backend, "torch"):
        u.zero_grad()
        x = x0.clone().requires_grad_()
        x1 = dflow_fast.solve(u, x, steps=4, backend=b, **kw)
        (x1 * cot).sum().backward()
        res[b] = (x1.detach(), x.grad, [p.grad.clone() for p in u.parameters()])
    (x1b, gxb, gpb), (x1t, gxt, gpt) = res[backend], res["torch"]
    assert rel_err(x1b, x1t) <= 1e-12
    assert rel_err(gxb, gxt) <= 1e-12
    for a, b in zip(gpb, gpt):
        assert b.norm() > 0 and rel_err(a, b) <= 1e-12


@grid("backend, kind, solver, gradient", COMPILED, ["mlp", "conv"], ["euler", "midpoint"],
      ["adjoint", "backprop"])
def test_solve_gradient_matches_torch(backend, kind, solver, gradient):
    solve_both(backend, kind, solver=solver, gradient=gradient)


@grid("backend, kind, solver, gradient", COMPILED, ["mlp", "conv"], REVERSIBLE,
      ["reversible", "backprop", "adjoint"])
def test_reversible_solve_gradient_matches_torch(backend, kind, solver, gradient):
    """The reversible solvers with the backend's kernels for their state updates."""
    solve_both(backend, kind, solver=solver, gradient=gradient,
               coupling=None if solver == "reversible_heun" else 0.8)


@grid("backend", COMPILED)
def test_optimize_matches_torch(backend):
    device = setup(backend)
    u, shape = make_velocity("mlp", torch.float64)
    u = u.to(device).requires_grad_(False)
    x0 = randn(3, *shape, dtype=torch.float64, device=device)
    target = randn(3, *shape, dtype=torch.float64, device=device)

    def cost(x1):
        return ((x1 - target) ** 2).sum(1)

    out = {b: dflow_fast.optimize(u, cost, x0, steps=3, solver="midpoint", max_iter=8,
                                  history_size=4, regularization=dflow_fast.ChiPrior(0.1),
                                  backend=b)
           for b in (backend, "torch")}
    a, b = out[backend], out["torch"]
    assert a.status == b.status and a.nit.tolist() == b.nit.tolist()
    assert int(a.nit.min()) >= 2  # the two-loop recursion ran with a history
    assert rel_err(a.x0, b.x0) <= 1e-10
    assert rel_err(a.loss, b.loss) <= 1e-10
