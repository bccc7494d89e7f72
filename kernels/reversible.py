"""State updates of the reversible solvers: reversible Heun and coupled reversible RK
(``dflow_fast/reversible.py``; formulas and their association as in the twins of
``dflow_fast/ops/twins.py``).

Elementwise like :mod:`.elementwise`: 1-D over the flattened contiguous tensors, one program per
BLOCK elements, a masked tail, fp32 math for fp16/bf16/fp32 and fp64 math for fp64. Every output
of an op is written in the same pass over its inputs. Scalar coefficients (``h/2``, ``1 - lam``,
...) are formed in float64 on the host; float64 kernels get each as three fp32-exact parts
(:func:`._common.split_f64`). Shapes: every tensor ``[B, *S]``, one shape, dtype and device.
"""
from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ops import autograd as _ag
from ._common import check_same, check_scalar, split_f64, wrap_triton
from .elementwise import BLOCK, NUM_WARPS, _grid


@triton.jit
def _coef(hi, mid, lo, F64: tl.constexpr):
    # A host scalar in the kernel's math type: rebuilt from its parts for fp64, else fp32 as is.
    c = hi
    if F64:
        c = tl.cast(hi, tl.float64) + tl.cast(mid, tl.float64) + tl.cast(lo, tl.float64)
    return c


@triton.jit
def _ld(ptr, offs, mask, F64: tl.constexpr):
    x = tl.load(ptr + offs, mask=mask)
    if not F64:
        x = x.to(tl.float32)  # opmath of fp16/bf16 (a no-op for fp32)
    return x


@triton.jit
def _heun_predict_kernel(y_ptr, yh_ptr, f_ptr, out_ptr, n, h0, h1, h2,
                         BLOCK: tl.constexpr, F64: tl.constexpr):
    # 2 y - yhat + h f
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    h = _coef(h0, h1, h2, F64)
    y = _ld(y_ptr, offs, mask, F64)
    yh = _ld(yh_ptr, offs, mask, F64)
    f = _ld(f_ptr, offs, mask, F64)
    out = (2.0 * y - yh) + h * f
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _heun_step_kernel(y_ptr, yh_ptr, f_ptr, fn_ptr, y1_ptr, yh2_ptr, n, hh0, hh1, hh2,
                      hn0, hn1, hn2, BLOCK: tl.constexpr, F64: tl.constexpr):
    # y' = y + (h/2)(f + fnext);  yhat'' = 2 y' - yhat + hnext fnext, from y' before rounding
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    half_h = _coef(hh0, hh1, hh2, F64)
    hnext = _coef(hn0, hn1, hn2, F64)
    y = _ld(y_ptr, offs, mask, F64)
    yh = _ld(yh_ptr, offs, mask, F64)
    f = _ld(f_ptr, offs, mask, F64)
    fn = _ld(fn_ptr, offs, mask, F64)
    y1 = y + half_h * (f + fn)
    yh2 = (2.0 * y1 - yh) + hnext * fn
    tl.store(y1_ptr + offs, y1.to(y1_ptr.dtype.element_ty), mask=mask)
    tl.store(yh2_ptr + offs, yh2.to(yh2_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _heun_adjoint_kernel(ay_ptr, ayh_ptr, w_ptr, oy_ptr, oyh_ptr, og_ptr, n, hh0, hh1, hh2,
                         h0, h1, h2, hn0, hn1, hn2, BLOCK: tl.constexpr, F64: tl.constexpr):
    # c = a_yhat + w:  (a_y + 2c,  -c,  (h/2) a_y + h c + (hnext/2)(a_y + 2c))
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    half_h = _coef(hh0, hh1, hh2, F64)
    h = _coef(h0, h1, h2, F64)
    half_hn = _coef(hn0, hn1, hn2, F64)
    ay = _ld(ay_ptr, offs, mask, F64)
    c = _ld(ayh_ptr, offs, mask, F64) + _ld(w_ptr, offs, mask, F64)
    ay1 = ay + 2.0 * c
    g = (half_h * ay + h * c) + half_hn * ay1
    tl.store(oy_ptr + offs, ay1.to(oy_ptr.dtype.element_ty), mask=mask)
    tl.store(oyh_ptr + offs, (-c).to(oyh_ptr.dtype.element_ty), mask=mask)
    tl.store(og_ptr + offs, g.to(og_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _coupled_forward_kernel(y_ptr, z_ptr, v_ptr, out_ptr, n, l0, l1, l2, m0, m1, m2,
                            h0, h1, h2, BLOCK: tl.constexpr, F64: tl.constexpr):
    # lam y + (1 - lam) z + h v
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    lam = _coef(l0, l1, l2, F64)
    one_minus_lam = _coef(m0, m1, m2, F64)
    h = _coef(h0, h1, h2, F64)
    y = _ld(y_ptr, offs, mask, F64)
    z = _ld(z_ptr, offs, mask, F64)
    v = _ld(v_ptr, offs, mask, F64)
    out = (lam * y + one_minus_lam * z) + h * v
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _coupled_inverse_kernel(y1_ptr, z_ptr, v_ptr, out_ptr, n, l0, l1, l2, m0, m1, m2,
                            h0, h1, h2, BLOCK: tl.constexpr, F64: tl.constexpr):
    # (y1 - (1 - lam) z - h v) / lam
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    lam = _coef(l0, l1, l2, F64)
    one_minus_lam = _coef(m0, m1, m2, F64)
    h = _coef(h0, h1, h2, F64)
    y1 = _ld(y1_ptr, offs, mask, F64)
    z = _ld(z_ptr, offs, mask, F64)
    v = _ld(v_ptr, offs, mask, F64)
    num = (y1 - one_minus_lam * z) - h * v
    if F64:
        out = num / lam
    else:
        # IEEE division, not the approximate fp32 '/' triton emits by default: this inverse runs
        # once per step of every reversible backward sweep, where each ulp of drift compounds.
        out = tl.div_rn(num, lam)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _coupled_adjoint_kernel(az_ptr, b_ptr, w_ptr, oy_ptr, oz_ptr, n, l0, l1, l2, m0, m1, m2,
                            h0, h1, h2, BLOCK: tl.constexpr, F64: tl.constexpr):
    # (lam b,  a_z + (1 - lam) b + h w)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    lam = _coef(l0, l1, l2, F64)
    one_minus_lam = _coef(m0, m1, m2, F64)
    h = _coef(h0, h1, h2, F64)
    az = _ld(az_ptr, offs, mask, F64)
    b = _ld(b_ptr, offs, mask, F64)
    w = _ld(w_ptr, offs, mask, F64)
    tl.store(oy_ptr + offs, (lam * b).to(oy_ptr.dtype.element_ty), mask=mask)
    oz = (az + one_minus_lam * b) + h * w
    tl.store(oz_ptr + offs, oz.to(oz_ptr.dtype.element_ty), mask=mask)


def _coefs(f64: bool, *values: float) -> list:
    """The kernels' scalar arguments: each value as three fp32-exact parts for fp64 kernels, as
    ``(value, 0, 0)`` otherwise (triton passes it as fp32, the opmath of the other dtypes)."""
    out = []
    for v in values:
        out.extend(split_f64(v) if f64 else (v, 0.0, 0.0))
    return out


# ----------------------------------------------------------------------------------------------
# registered ops (inputs already validated and contiguous)

@torch.library.triton_op("dflow_fast_triton::heun_predict", mutates_args=())
def _heun_predict_op(y: Tensor, yhat: Tensor, f: Tensor, h: float) -> Tensor:
    out = torch.empty_like(y)
    n = y.numel()
    if n > 0:
        f64 = y.dtype == torch.float64
        wrap_triton(_heun_predict_kernel)[_grid(n)](y, yhat, f, out, n, *_coefs(f64, h),
                                                    BLOCK=BLOCK, F64=f64, num_warps=NUM_WARPS)
    return out


@torch.library.triton_op("dflow_fast_triton::heun_step", mutates_args=())
def _heun_step_op(y: Tensor, yhat: Tensor, f: Tensor, fnext: Tensor, h: float,
                  hnext: float) -> Tuple[Tensor, Tensor]:
    y1, yhat2 = torch.empty_like(y), torch.empty_like(y)
    n = y.numel()
    if n > 0:
        f64 = y.dtype == torch.float64
        wrap_triton(_heun_step_kernel)[_grid(n)](y, yhat, f, fnext, y1, yhat2, n,
                                                 *_coefs(f64, 0.5 * h, hnext),
                                                 BLOCK=BLOCK, F64=f64, num_warps=NUM_WARPS)
    return y1, yhat2


@torch.library.triton_op("dflow_fast_triton::heun_adjoint", mutates_args=())
def _heun_adjoint_op(a_y: Tensor, a_yhat: Tensor, w: Tensor, h: float,
                     hnext: float) -> Tuple[Tensor, Tensor, Tensor]:
    o_y, o_yhat, o_g = torch.empty_like(a_y), torch.empty_like(a_y), torch.empty_like(a_y)
    n = a_y.numel()
    if n > 0:
        f64 = a_y.dtype == torch.float64
        wrap_triton(_heun_adjoint_kernel)[_grid(n)](a_y, a_yhat, w, o_y, o_yhat, o_g, n,
                                                    *_coefs(f64, 0.5 * h, h, 0.5 * hnext),
                                                    BLOCK=BLOCK, F64=f64, num_warps=NUM_WARPS)
    return o_y, o_yhat, o_g


@torch.library.triton_op("dflow_fast_triton::coupled_forward", mutates_args=())
def _coupled_forward_op(y: Tensor, z: Tensor, v: Tensor, lam: float, h: float) -> Tensor:
    out = torch.empty_like(y)
    n = y.numel()
    if n > 0:
        f64 = y.dtype == torch.float64
        wrap_triton(_coupled_forward_kernel)[_grid(n)](y, z, v, out, n,
                                                       *_coefs(f64, lam, 1.0 - lam, h),
                                                       BLOCK=BLOCK, F64=f64, num_warps=NUM_WARPS)
    return out


@torch.library.triton_op("dflow_fast_triton::coupled_inverse", mutates_args=())
def _coupled_inverse_op(y1: Tensor, z: Tensor, v: Tensor, lam: float, h: float) -> Tensor:
    out = torch.empty_like(y1)
    n = y1.numel()
    if n > 0:
        f64 = y1.dtype == torch.float64
        wrap_triton(_coupled_inverse_kernel)[_grid(n)](y1, z, v, out, n,
                                                       *_coefs(f64, lam, 1.0 - lam, h),
                                                       BLOCK=BLOCK, F64=f64, num_warps=NUM_WARPS)
    return out


@torch.library.triton_op("dflow_fast_triton::coupled_adjoint", mutates_args=())
def _coupled_adjoint_op(a_z: Tensor, b: Tensor, w: Tensor, lam: float,
                        h: float) -> Tuple[Tensor, Tensor]:
    o_y, o_z = torch.empty_like(a_z), torch.empty_like(a_z)
    n = a_z.numel()
    if n > 0:
        f64 = a_z.dtype == torch.float64
        wrap_triton(_coupled_adjoint_kernel)[_grid(n)](a_z, b, w, o_y, o_z, n,
                                                       *_coefs(f64, lam, 1.0 - lam, h),
                                                       BLOCK=BLOCK, F64=f64, num_warps=NUM_WARPS)
    return o_y, o_z


# One set of autograd formulas for every compiled backend (dflow_fast/ops/autograd.py).
_heun_predict_op.register_autograd(_ag.heun_predict_backward, setup_context=_ag.scalars_setup)
_heun_step_op.register_autograd(_ag.heun_step_backward, setup_context=_ag.scalars_setup)
_heun_adjoint_op.register_autograd(_ag.heun_adjoint_backward, setup_context=_ag.scalars_setup)
_coupled_forward_op.register_autograd(_ag.coupled_forward_backward,
                                      setup_context=_ag.scalars_setup)
_coupled_inverse_op.register_autograd(_ag.coupled_inverse_backward,
                                      setup_context=_ag.scalars_setup)
_coupled_adjoint_op.register_autograd(_ag.coupled_adjoint_backward,
                                      setup_context=_ag.scalars_setup)


# ----------------------------------------------------------------------------------------------
# public functions (signatures of the twins in dflow_fast.ops.twins)

def heun_predict(y: Tensor, yhat: Tensor, f: Tensor, h: float) -> Tensor:
    """Reversible Heun's prediction ``2 y - yhat + h f``, all ``[B, *S]``."""
    check_same("heun_predict", _heun_predict_kernel, y=y, yhat=yhat, f=f)
    h = check_scalar("heun_predict: h", h)
    return _heun_predict_op(y.contiguous(), yhat.contiguous(), f.contiguous(), h)


def heun_step(y: Tensor, yhat: Tensor, f: Tensor, fnext: Tensor, h: float,
              hnext: float) -> Tuple[Tensor, Tensor]:
    """``(y' = y + (h/2)(f + fnext), 2 y' - yhat + hnext fnext)`` in one pass, all ``[B, *S]``."""
    check_same("heun_step", _heun_step_kernel, y=y, yhat=yhat, f=f, fnext=fnext)
    h = check_scalar("heun_step: h", h)
    hnext = check_scalar("heun_step: hnext", hnext)
    return _heun_step_op(y.contiguous(), yhat.contiguous(), f.contiguous(), fnext.contiguous(),
                         h, hnext)


def heun_adjoint(a_y: Tensor, a_yhat: Tensor, w: Tensor, h: float,
                 hnext: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Reversible Heun's adjoint through one step, all ``[B, *S]``; with ``c = a_yhat + w``:
    ``(a_y + 2c, -c, (h/2) a_y + h c + (hnext/2)(a_y + 2c))``."""
    check_same("heun_adjoint", _heun_adjoint_kernel, a_y=a_y, a_yhat=a_yhat, w=w)
    h = check_scalar("heun_adjoint: h", h)
    hnext = check_scalar("heun_adjoint: hnext", hnext)
    return _heun_adjoint_op(a_y.contiguous(), a_yhat.contiguous(), w.contiguous(), h, hnext)


def coupled_forward(y: Tensor, z: Tensor, v: Tensor, lam: float, h: float) -> Tensor:
    """Coupled reversible RK's update ``lam y + (1 - lam) z + h v``, all ``[B, *S]``."""
    check_same("coupled_forward", _coupled_forward_kernel, y=y, z=z, v=v)
    lam = check_scalar("coupled_forward: lam", lam)
    h = check_scalar("coupled_forward: h", h)
    return _coupled_forward_op(y.contiguous(), z.contiguous(), v.contiguous(), lam, h)


def coupled_inverse(y1: Tensor, z: Tensor, v: Tensor, lam: float, h: float) -> Tensor:
    """Inverse of :func:`coupled_forward`: ``(y1 - (1 - lam) z - h v) / lam``, all ``[B, *S]``."""
    check_same("coupled_inverse", _coupled_inverse_kernel, y1=y1, z=z, v=v)
    lam = check_scalar("coupled_inverse: lam", lam)
    if lam == 0.0:
        raise ValueError("coupled_inverse: lam must be nonzero (the inverse divides by it), got 0")
    h = check_scalar("coupled_inverse: h", h)
    return _coupled_inverse_op(y1.contiguous(), z.contiguous(), v.contiguous(), lam, h)


def coupled_adjoint(a_z: Tensor, b: Tensor, w: Tensor, lam: float,
                    h: float) -> Tuple[Tensor, Tensor]:
    """Coupled reversible RK's adjoint through one step: ``(lam b, a_z + (1 - lam) b + h w)``,
    all ``[B, *S]``."""
    check_same("coupled_adjoint", _coupled_adjoint_kernel, a_z=a_z, b=b, w=w)
    lam = check_scalar("coupled_adjoint: lam", lam)
    h = check_scalar("coupled_adjoint: h", h)
    return _coupled_adjoint_op(a_z.contiguous(), b.contiguous(), w.contiguous(), lam, h)


__all__ = ["heun_predict", "heun_step", "heun_adjoint", "coupled_forward", "coupled_inverse",
           "coupled_adjoint"]
