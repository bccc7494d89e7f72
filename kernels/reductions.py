"""Per-sample reductions: the χ_d prior with its squared norms, value and gradient in two launches.

``x: [B, D]``, grid ``(B, P)``: each row is split into P chunks of ``ITERS * BLOCK`` elements so
that a small batch still fills the GPU. Launch 1 writes per-chunk partial sums of squares
``part: [B, P]``; launch 2 reduces a row's partials (P <= MAX_CHUNKS, one small load), and every
program writes its chunk of the gradient; chunk 0 also writes ``sq`` and ``value``.
Deterministic (no atomics). Sums are fp32 for fp16/bf16/fp32 inputs and fp64 for fp64.
"""
from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ops import autograd as _ag
from ._common import (LOW_DTYPES, check_device, check_scalar, check_tensor, split_f64,
                      wrap_triton)

BLOCK = 2048
NUM_WARPS = 8
#: most chunks per row: bounds launch 2's partial-sum load (a power of two)
MAX_CHUNKS = 128


@triton.jit
def _sumsq_kernel(x_ptr, part_ptr, D, P, ITERS, BLOCK: tl.constexpr, UPCAST: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    row = x_ptr + b * D
    if UPCAST:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK], dtype=x_ptr.dtype.element_ty)
    for i in range(0, ITERS):
        offs = (p * ITERS + i).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(row + offs, mask=offs < D, other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
        acc += x * x
    tl.store(part_ptr + b * P + p, tl.sum(acc, axis=0))


@triton.jit
def _chi_kernel(x_ptr, part_ptr, sq_ptr, val_ptr, grad_ptr, D, P, ITERS, w_hi, w_mid, w_lo,
                BLOCK: tl.constexpr, PBLOCK: tl.constexpr, UPCAST: tl.constexpr,
                F64: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    pidx = tl.arange(0, PBLOCK)
    sq = tl.sum(tl.load(part_ptr + b * P + pidx, mask=pidx < P, other=0.0), axis=0)
    acc_ty = part_ptr.dtype.element_ty  # fp32, or fp64 for fp64 inputs
    # weight arrives as fp32-exact parts (scalar float args are fp32): rebuild it in acc_ty.
    w = tl.cast(w_hi, acc_ty) + tl.cast(w_mid, acc_ty) + tl.cast(w_lo, acc_ty)
    dm1 = tl.cast(D - 1, acc_ty)
    if F64:
        ratio = dm1 / sq
    else:
        # 1 - (D-1)/sq cancels near the typical shell (sq ~ D): IEEE division, not the approximate
        # fp32 '/' triton emits by default, keeps it as accurate as PyTorch's.
        ratio = tl.div_rn(dm1, sq)
    coef = w * (1.0 - ratio)
    if p == 0:
        tl.store(sq_ptr + b, sq)
        tl.store(val_ptr + b, w * (0.5 * sq - 0.5 * dm1 * tl.log(sq)))
    row = x_ptr + b * D
    for i in range(0, ITERS):
        offs = (p * ITERS + i).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < D
        x = tl.load(row + offs, mask=mask)
        if UPCAST:
            x = x.to(tl.float32)
        tl.store(grad_ptr + b * D + offs, (coef * x).to(grad_ptr.dtype.element_ty), mask=mask)


def _chunks(D: int) -> Tuple[int, int]:
    """(P chunks per row, ITERS blocks per chunk) with P <= MAX_CHUNKS."""
    nblk = max(1, triton.cdiv(D, BLOCK))
    iters = triton.cdiv(nblk, MAX_CHUNKS)
    return triton.cdiv(nblk, iters), iters


@torch.library.triton_op("dflow_fast_triton::chi_prior", mutates_args=())
def _chi_prior_op(x: Tensor, weight: float) -> Tuple[Tensor, Tensor, Tensor]:
    B, D = x.shape
    acc = torch.float32 if x.dtype in LOW_DTYPES else x.dtype
    sq = torch.empty(B, dtype=acc, device=x.device)
    value = torch.empty(B, dtype=acc, device=x.device)
    grad = torch.empty_like(x)
    if B == 0:
        return sq, value, grad
    P, iters = _chunks(D)
    part = torch.empty(B, P, dtype=acc, device=x.device)
    w_hi, w_mid, w_lo = split_f64(weight) if acc == torch.float64 else (weight, 0.0, 0.0)
    upcast = x.dtype in LOW_DTYPES
    wrap_triton(_sumsq_kernel)[(B, P)](x, part, D, P, iters, BLOCK=BLOCK, UPCAST=upcast,
                                       num_warps=NUM_WARPS)
    wrap_triton(_chi_kernel)[(B, P)](x, part, sq, value, grad, D, P, iters, w_hi, w_mid, w_lo,
                                     BLOCK=BLOCK, PBLOCK=MAX_CHUNKS, UPCAST=upcast,
                                     F64=acc == torch.float64, num_warps=NUM_WARPS)
    return sq, value, grad


# Same formulas as the C++/CUDA op, the grad output included (dflow_fast/ops/autograd.py).
_chi_prior_op.register_autograd(_ag.chi_prior_backward, setup_context=_ag.chi_prior_setup)


def chi_prior(x: Tensor, weight: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-sample squared norms and the χ_d prior's value and gradient.

    Args:
        x: [B, D] (float16, bfloat16, float32 or float64).
        weight: prior weight.
    Returns:
        ``(sq [B], value [B], grad [B, D])``: ``sq = ||x||^2``,
        ``value = weight (0.5 sq - 0.5 (D - 1) log sq)``, ``grad = weight (1 - (D - 1)/sq) x``;
        sq and value are fp32 for fp16/bf16 inputs (x's dtype otherwise), grad has x's dtype.
    """
    check_tensor("x", x, "chi_prior")
    if x.dim() != 2:
        raise ValueError(f"chi_prior: x must be [B, D], got shape {tuple(x.shape)}")
    if x.shape[1] < 1:
        raise ValueError(f"chi_prior: x must have D >= 1 features, got shape {tuple(x.shape)}")
    check_device(x, "chi_prior", _sumsq_kernel)
    weight = check_scalar("chi_prior: weight", weight)
    return _chi_prior_op(x.contiguous(), weight)


__all__ = ["chi_prior"]
