"""Elementwise solver updates: ``axpy`` (Euler / midpoint stages) and the adjoint accumulations.

Each kernel is 1-D over the flattened contiguous tensors: one program per BLOCK elements, a
masked tail, fp32 math for fp16/bf16 (cast back on store), native math for fp32/fp64.
Shapes: ``x, v, a, w, w2, w1: [B, *S]``, all one shape, dtype and device.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ops import autograd as _ag
from ._common import LOW_DTYPES, check_same, check_scalar, split_f64, wrap_triton

# Memory-bound: 16 elements per thread (4 x 16-byte vectors for fp32) keeps enough loads in flight
# without register pressure, and fewer, larger programs also keep the interpreter (CPU tests) fast.
BLOCK = 4096
NUM_WARPS = 8


@triton.jit
def _axpy_kernel(x_ptr, v_ptr, out_ptr, n, h_hi, h_mid, h_lo,
                 BLOCK: tl.constexpr, F64: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    v = tl.load(v_ptr + offs, mask=mask)
    if F64:
        # h arrives as three fp32-exact parts (scalar float args are fp32): rebuild the double.
        h = tl.cast(h_hi, tl.float64) + tl.cast(h_mid, tl.float64) + tl.cast(h_lo, tl.float64)
        y = x + h * v
    else:
        y = x.to(tl.float32) + h_hi * v.to(tl.float32)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_kernel(a_ptr, b_ptr, c_ptr, out_ptr, n,
                BLOCK: tl.constexpr, THREE: tl.constexpr, UPCAST: tl.constexpr):
    # out = a + b (+ c when THREE), summed left to right like the reference.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    s = tl.load(a_ptr + offs, mask=mask)
    b = tl.load(b_ptr + offs, mask=mask)
    if UPCAST:
        s = s.to(tl.float32)
        b = b.to(tl.float32)
    s = s + b
    if THREE:
        c = tl.load(c_ptr + offs, mask=mask)
        if UPCAST:
            c = c.to(tl.float32)
        s = s + c
    tl.store(out_ptr + offs, s.to(out_ptr.dtype.element_ty), mask=mask)


def _grid(n: int):
    return (triton.cdiv(n, BLOCK),)


# ----------------------------------------------------------------------------------------------
# registered ops (inputs already validated and contiguous)

@torch.library.triton_op("dflow_fast_triton::axpy", mutates_args=())
def _axpy_op(x: Tensor, v: Tensor, h: float) -> Tensor:
    out = torch.empty_like(x)
    n = x.numel()
    if n > 0:
        f64 = x.dtype == torch.float64
        h_hi, h_mid, h_lo = split_f64(h) if f64 else (h, 0.0, 0.0)
        wrap_triton(_axpy_kernel)[_grid(n)](x, v, out, n, h_hi, h_mid, h_lo,
                                            BLOCK=BLOCK, F64=f64, num_warps=NUM_WARPS)
    return out


@torch.library.triton_op("dflow_fast_triton::adjoint_euler", mutates_args=())
def _adjoint_euler_op(a: Tensor, w: Tensor) -> Tensor:
    out = torch.empty_like(a)
    n = a.numel()
    if n > 0:
        wrap_triton(_sum_kernel)[_grid(n)](a, w, w, out, n, BLOCK=BLOCK, THREE=False,
                                           UPCAST=a.dtype in LOW_DTYPES, num_warps=NUM_WARPS)
    return out


@torch.library.triton_op("dflow_fast_triton::adjoint_midpoint", mutates_args=())
def _adjoint_midpoint_op(a: Tensor, w2: Tensor, w1: Tensor) -> Tensor:
    out = torch.empty_like(a)
    n = a.numel()
    if n > 0:
        wrap_triton(_sum_kernel)[_grid(n)](a, w2, w1, out, n, BLOCK=BLOCK, THREE=True,
                                           UPCAST=a.dtype in LOW_DTYPES, num_warps=NUM_WARPS)
    return out


# One set of autograd formulas for every compiled backend (dflow_fast/ops/autograd.py).
_axpy_op.register_autograd(_ag.axpy_backward, setup_context=_ag.axpy_setup)
_adjoint_euler_op.register_autograd(_ag.adjoint_euler_backward, setup_context=_ag.no_setup)
_adjoint_midpoint_op.register_autograd(_ag.adjoint_midpoint_backward, setup_context=_ag.no_setup)


# ----------------------------------------------------------------------------------------------
# public functions (signatures of the twins in dflow_fast.ops.twins)

def axpy(x: Tensor, v: Tensor, h: float) -> Tensor:
    """``x + h * v`` for ``x, v: [B, *S]``: the Euler update and both midpoint stages."""
    check_same("axpy", _axpy_kernel, x=x, v=v)
    h = check_scalar("axpy: h", h)
    return _axpy_op(x.contiguous(), v.contiguous(), h)


def adjoint_euler(a: Tensor, w: Tensor) -> Tensor:
    """Euler adjoint accumulation ``a + w`` for ``a, w: [B, *S]``."""
    check_same("adjoint_euler", _sum_kernel, a=a, w=w)
    return _adjoint_euler_op(a.contiguous(), w.contiguous())


def adjoint_midpoint(a: Tensor, w2: Tensor, w1: Tensor) -> Tensor:
    """Midpoint adjoint accumulation ``a + w2 + w1`` in one pass, ``a, w2, w1: [B, *S]``."""
    check_same("adjoint_midpoint", _sum_kernel, a=a, w2=w2, w1=w1)
    return _adjoint_midpoint_op(a.contiguous(), w2.contiguous(), w1.contiguous())


__all__ = ["axpy", "adjoint_euler", "adjoint_midpoint"]
