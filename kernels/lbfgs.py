"""Batched L-BFGS two-loop recursion (Nocedal & Wright, Alg. 7.4), one program per sample.

Shapes: ``g: [B, D]``, ``S, Y: [B, m, D]`` (oldest first, newest at m-1; empty slots zero with
rho = 0), ``rho: [B, m]``, ``gamma: [B]`` -> ``d: [B, D]``.

The recursion is sequential in the history index, so a sample's program sweeps its row over D in
BLOCK chunks, keeping q (then r) in a global work buffer ([B, D], fp32 for fp16/bf16, else the
input dtype; the output itself unless that is fp16/bf16). Each dot product is fused into the
sweep that produces its operand, so one sweep per history slot and loop (2m + 1 in all) instead
of 4m::

    sweep 0:        q = -g                      dot <S[m-1], q>
    loop 1, j=m-1..0: alpha_j = rho_j <S_j, q>;  q = q - alpha_j Y_j   dot <S[j-1], q>
                      (at j = 0 the sweep also scales r = gamma q and dots <Y[0], r>)
    loop 2, j=0..m-1: beta = rho_j <Y_j, r>;     r = r + (alpha_j - beta) S_j   dot <Y[j+1], r>

The arithmetic is the reference's, in the same order, except the dot products' summation order
(and fused multiply-adds where the compiler contracts them). Parallelism is B programs: fine for
a many-sample batch; a small batch with a very large D leaves most of a big GPU idle.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ops import autograd as _ag
from ._common import LOW_DTYPES, check_device, check_tensor, wrap_triton

# A sample's sweeps run on one SM, so its bandwidth is bounded by the bytes in flight: large
# blocks (3 loads of BLOCK elements per step) and 16 warps keep more loads outstanding.
BLOCK = 4096
NUM_WARPS = 16


@triton.jit
def _sweep(src, upd, n_upd, coef, scale, dot, n_dot, dst, out, n_out, D,
           BLOCK: tl.constexpr, WRITE_OUT: tl.constexpr):
    """``dst = (src + coef * upd) * scale`` over one row of D elements; returns ``<dot, dst>``.

    ``upd``, ``dot`` and ``out`` (an extra copy of dst in out's dtype, only when WRITE_OUT) are
    read/written where their length n_* is D; passing 0 masks them off (no memory traffic).
    """
    acc_ty = dst.dtype.element_ty
    acc = tl.zeros([BLOCK], dtype=acc_ty)
    for start in range(0, D, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < D
        q = tl.load(src + offs, mask=mask, other=0.0).to(acc_ty)
        u = tl.load(upd + offs, mask=offs < n_upd, other=0.0).to(acc_ty)
        q = (q + coef * u) * scale
        tl.store(dst + offs, q, mask=mask)
        if WRITE_OUT:
            tl.store(out + offs, q.to(out.dtype.element_ty), mask=offs < n_out)
        w = tl.load(dot + offs, mask=offs < n_dot, other=0.0).to(acc_ty)
        acc += w * q
    # The next sweep reads dst back, possibly through other threads of this program.
    tl.debug_barrier()
    return tl.sum(acc, axis=0)


@triton.jit
def _lbfgs_kernel(g_ptr, S_ptr, Y_ptr, rho_ptr, gamma_ptr, alpha_ptr, work_ptr, out_ptr, m, D,
                  BLOCK: tl.constexpr, SEPARATE_OUT: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    acc_ty = work_ptr.dtype.element_ty
    g = g_ptr + b * D
    S = S_ptr + b * m * D
    Y = Y_ptr + b * m * D
    work = work_ptr + b * D
    out = out_ptr + b * D
    rho = rho_ptr + b * m
    alpha = alpha_ptr + b * m
    gamma = tl.load(gamma_ptr + b).to(acc_ty)
    WO: tl.constexpr = SEPARATE_OUT  # the last sweep also writes the fp16/bf16 output

    # sweep 0: q = -g (r = -gamma g directly when there is no history), dot <S[m-1], q>
    if m > 0:
        acc = _sweep(g, g, 0, 0.0, -1.0, S + (m - 1) * D, D, work, out, 0, D, BLOCK, WO)
    else:
        acc = _sweep(g, g, 0, 0.0, -gamma, S, 0, work, out, D, D, BLOCK, WO)

    # loop 1, newest to oldest; its last sweep (j = 0) turns q into r = gamma q
    for i in range(0, m):
        j = m - 1 - i
        a_j = tl.load(rho + j).to(acc_ty) * acc
        tl.store(alpha + j, a_j)
        if j > 0:
            acc = _sweep(work, Y + j * D, D, -a_j, 1.0, S + (j - 1) * D, D, work, out, 0, D,
                         BLOCK, WO)
        else:
            acc = _sweep(work, Y, D, -a_j, gamma, Y, D, work, out, 0, D, BLOCK, WO)

    # loop 2, oldest to newest
    for j in range(0, m):
        c = tl.load(alpha + j) - tl.load(rho + j).to(acc_ty) * acc
        if j < m - 1:
            acc = _sweep(work, S + j * D, D, c, 1.0, Y + (j + 1) * D, D, work, out, 0, D,
                         BLOCK, WO)
        else:
            acc = _sweep(work, S + j * D, D, c, 1.0, Y, 0, work, out, D, D, BLOCK, WO)


@torch.library.triton_op("dflow_fast_triton::lbfgs_direction", mutates_args=())
def _lbfgs_direction_op(g: Tensor, S: Tensor, Y: Tensor, rho: Tensor, gamma: Tensor) -> Tensor:
    B, D = g.shape
    m = S.shape[1]
    out = torch.empty_like(g)
    if B == 0 or D == 0:
        return out
    low = g.dtype in LOW_DTYPES
    acc = torch.float32 if low else g.dtype
    work = torch.empty(B, D, dtype=acc, device=g.device) if low else out
    alpha = torch.empty(B, max(m, 1), dtype=acc, device=g.device)
    wrap_triton(_lbfgs_kernel)[(B,)](g, S, Y, rho, gamma, alpha, work, out, m, D,
                                     BLOCK=BLOCK, SEPARATE_OUT=low, num_warps=NUM_WARPS)
    return out


# Not differentiable, like the C++/CUDA op: the backward raises a clear error.
_lbfgs_direction_op.register_autograd(_ag.lbfgs_direction_backward, setup_context=_ag.no_setup)


def lbfgs_direction(g: Tensor, S: Tensor, Y: Tensor, rho: Tensor, gamma: Tensor) -> Tensor:
    """Search directions ``d = -H g`` of the batched L-BFGS two-loop recursion.

    Args:
        g: [B, D] gradients.
        S, Y: [B, m, D] step and gradient-change histories, oldest first, newest at m-1;
            empty slots are zero with ``rho = 0`` (exact no-ops).
        rho: [B, m] ``1 / <y, s>`` per slot.
        gamma: [B] initial inverse-Hessian scale.
    All of one dtype and device; fp16/bf16 are computed in fp32.
    Returns:
        d: [B, D], g's dtype.
    """
    names = ("g", "S", "Y", "rho", "gamma")
    ts = (g, S, Y, rho, gamma)
    for name, t in zip(names, ts):
        check_tensor(name, t, "lbfgs_direction")
    shapes = ", ".join(f"{n}: {tuple(t.shape)}" for n, t in zip(names, ts))
    if g.dim() != 2 or S.dim() != 3:
        raise ValueError(f"lbfgs_direction: expected g [B, D], S and Y [B, m, D], rho [B, m], "
                         f"gamma [B]; got {shapes}")
    B, D = g.shape
    m = S.shape[1]
    if (S.shape != (B, m, D) or Y.shape != (B, m, D) or rho.shape != (B, m)
            or gamma.shape != (B,)):
        raise ValueError(f"lbfgs_direction: expected g [B, D], S and Y [B, m, D], rho [B, m], "
                         f"gamma [B]; got {shapes}")
    for name, t in zip(names[1:], ts[1:]):
        if t.dtype != g.dtype or t.device != g.device:
            raise ValueError(f"lbfgs_direction: {name} must match g in dtype and device; got "
                             f"g: {g.dtype} {g.device}, {name}: {t.dtype} {t.device}")
    check_device(g, "lbfgs_direction", _lbfgs_kernel)
    return _lbfgs_direction_op(g.contiguous(), S.contiguous(), Y.contiguous(), rho.contiguous(),
                               gamma.contiguous())


__all__ = ["lbfgs_direction"]
