"""The CUDA kernels (``torch.ops.dflow_fast.*`` on CUDA tensors, backend "cuda") against their
PyTorch twins in float64, fp32/fp16/bf16/fp64, with the cases and tolerances of test_ops_cpp.py.

CI has no GPU: this module runs on a CUDA machine through ``bench/gpu_check.sh``; the CUDA sources
are compile-checked everywhere by test_nvcc_compile.py.
"""
from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device here; run bench/gpu_check.sh on a GPU machine",
                allow_module_level=True)

import dflow_fast  # noqa: E402
from dflow_fast.ops import ext as _ext  # noqa: E402
from dflow_fast.ops import twins as ref  # noqa: E402

from tests.helpers import make_velocity, rel_err  # noqa: E402
from tests.ops.test_ops_cpp import (CHI_SHAPES, DTYPES, LBFGS_CASES, REVERSIBLE_OPS, SHAPES,  # noqa: E402
                          _chi_prior_native, _id, check, check_reversible_op, lbfgs_inputs)

if not _ext.has_cuda():
    pytest.fail("dflow_fast._C was built without CUDA kernels on a CUDA machine: rebuild with "
                "DFLOW_FAST_CUDA=1 pip install --no-build-isolation -e .", pytrace=False)

ops = torch.ops.dflow_fast
DEV = torch.device("cuda")


def randn(*shape, dtype):
    return torch.randn(*shape, dtype=torch.float64, device=DEV).to(dtype)


def up(*ts):
    return [t.double() for t in ts]


@pytest.mark.parametrize("shape", SHAPES + [(3, 1 << 20), (5, 12345)], ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_elementwise(shape, dtype):
    a, b, c = (randn(*shape, dtype=dtype) for _ in range(3))
    check(ops.axpy(a, b, -0.37), ref.axpy(*up(a, b), -0.37), a + -0.37 * b, dtype, "elementwise")
    check(ops.adjoint_euler(a, b), ref.adjoint_euler(*up(a, b)), a + b, dtype, "elementwise")
    check(ops.adjoint_midpoint(a, b, c), ref.adjoint_midpoint(*up(a, b, c)), a + b + c, dtype,
          "elementwise")


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_elementwise_noncontiguous_and_misaligned(dtype):
    base = randn(6, 9, 4, dtype=dtype)
    x = base.transpose(0, 2)
    v = randn(4, 18, 6, dtype=dtype)[:, ::2]
    off = randn(4 * 9 * 6 + 1, dtype=dtype)[1:].view(4, 9, 6)  # storage offset: unaligned loads
    check(ops.axpy(x, v, 0.5), ref.axpy(*up(x, v), 0.5), x + 0.5 * v, dtype, "elementwise")
    check(ops.adjoint_midpoint(x, v, off), ref.adjoint_midpoint(*up(x, v, off)), x + v + off,
          dtype, "elementwise")


@pytest.mark.parametrize("shape", SHAPES + [(3, 1 << 20), (5, 12345)], ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("name", list(REVERSIBLE_OPS))
def test_reversible_op(name, dtype, shape):
    n_in = REVERSIBLE_OPS[name][0]
    check_reversible_op(name, getattr(ops, name), [randn(*shape, dtype=dtype)
                                                   for _ in range(n_in)])


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("name", list(REVERSIBLE_OPS))
def test_reversible_op_noncontiguous_and_misaligned(name, dtype):
    n = 4 * 9 * 6
    views = [randn(n + 1, dtype=dtype)[1:].view(4, 9, 6),  # storage offset: unaligned loads
             randn(6, 9, 4, dtype=dtype).transpose(0, 2),
             randn(4, 18, 6, dtype=dtype)[:, ::2],
             randn(4, 9, 6, dtype=dtype)]
    n_in = REVERSIBLE_OPS[name][0]
    check_reversible_op(name, getattr(ops, name), views[:n_in])
    # every input aligned but the last: the kernel must fall back to element-wise access
    aligned = [randn(4, 9, 6, dtype=dtype) for _ in range(n_in - 1)]
    check_reversible_op(name, getattr(ops, name), aligned + views[:1])


@pytest.mark.parametrize("name", list(REVERSIBLE_OPS))
def test_reversible_op_gradcheck_cuda(name):
    n_in, scalars, _ = REVERSIBLE_OPS[name]
    ts = [randn(2, 3, dtype=torch.float64).requires_grad_() for _ in range(n_in)]
    assert torch.autograd.gradcheck(lambda *a: getattr(ops, name)(*a, *scalars), ts)


@pytest.mark.parametrize("shape", CHI_SHAPES + [(4, 1 << 18)], ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_chi_prior(shape, dtype):
    x = randn(*shape, dtype=dtype)
    sq, value, grad = ops.chi_prior(x, 0.7)
    sq64, value64, grad64 = ref.chi_prior(x.double(), 0.7)
    sq_n, value_n, grad_n = _chi_prior_native(x, 0.7)
    check(sq, sq64, sq_n, dtype, "chi_prior")
    check(value, value64, value_n, dtype, "chi_prior")
    check(grad, grad64, grad_n, dtype, "chi_prior", scale=float((0.7 * x.double()).norm()))


@pytest.mark.parametrize("case", LBFGS_CASES + [(8, 10, 1 << 16, 2)],
                         ids=lambda c: "B{}-m{}-D{}-empty{}".format(*c))
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_lbfgs_direction(case, dtype):
    args = [t.to(DEV) for t in lbfgs_inputs(*case, dtype=dtype)]
    out = ops.lbfgs_direction(*args)
    check(out, ref.lbfgs_direction(*up(*args)), ref.lbfgs_direction(*args), dtype, "lbfgs")


@pytest.mark.parametrize("solver", ["euler", "midpoint"])
def test_solve_gradient_cuda_equals_torch(solver):
    velocity, shape = make_velocity("conv", torch.float64)
    velocity = velocity.to(DEV)
    x0 = torch.randn(3, *shape, dtype=torch.float64, device=DEV, requires_grad=True)
    grads = {}
    for backend in ("torch", "cuda"):
        x1 = dflow_fast.solve(velocity, x0, steps=4, solver=solver, backend=backend)
        grads[backend] = torch.autograd.grad(x1.pow(2).sum(), [x0, *velocity.parameters()])
    for a, b in zip(grads["cuda"], grads["torch"]):
        assert rel_err(a, b) <= 1e-12


@pytest.mark.parametrize("gradient", ["reversible", "backprop"])
@pytest.mark.parametrize("solver", ["reversible_heun", "reversible_euler", "reversible_midpoint"])
def test_reversible_solve_gradient_cuda_equals_torch(solver, gradient):
    velocity, shape = make_velocity("conv", torch.float64)
    velocity = velocity.to(DEV)
    x0 = torch.randn(3, *shape, dtype=torch.float64, device=DEV, requires_grad=True)
    coupling = None if solver == "reversible_heun" else 0.8
    out = {}
    for backend in ("torch", "cuda"):
        x1 = dflow_fast.solve(velocity, x0, steps=4, solver=solver, gradient=gradient,
                              coupling=coupling, backend=backend)
        out[backend] = (x1.detach(),) + torch.autograd.grad(x1.pow(2).sum(),
                                                            [x0, *velocity.parameters()])
    for a, b in zip(out["cuda"], out["torch"]):
        assert rel_err(a, b) <= 1e-12


def test_opcheck_cuda():
    from torch.library import opcheck
    x, v, w = (randn(3, 5, dtype=torch.float32) for _ in range(3))
    opcheck(ops.axpy.default, (x, v, 0.3))
    opcheck(ops.adjoint_midpoint.default, (x, v, w))
    opcheck(ops.chi_prior.default, (x, 0.2))
    opcheck(ops.lbfgs_direction.default, [t.to(DEV) for t in lbfgs_inputs(2, 3, 5, 1,
                                                                             torch.float32)])
    for name, (n_in, scalars, _) in REVERSIBLE_OPS.items():
        ts = [randn(3, 5, dtype=torch.float32) for _ in range(n_in)]
        opcheck(getattr(ops, name).default, (*ts, *scalars))
        opcheck(getattr(ops, name).default, (*[t.requires_grad_() for t in ts], *scalars))
