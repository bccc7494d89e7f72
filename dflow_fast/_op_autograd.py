"""Autograd formulas of the fused ops, shared by every compiled backend (the C++/CUDA ops in
``dflow_fast._ext`` and the Triton ops in ``dflow_fast.kernels``) so that all backends
differentiate identically, like their twins in ``dflow_fast._reference``.

Backward formulas are plain torch ops, so they are themselves differentiable (double backward).
lbfgs_direction alone has none: its registered backward raises a clear error.
"""
from __future__ import annotations

import torch


def axpy_setup(ctx, inputs, output):
    ctx.h = inputs[2]


def axpy_backward(ctx, grad):
    # d(x + h v) = dx + h dv
    return (grad if ctx.needs_input_grad[0] else None,
            grad * ctx.h if ctx.needs_input_grad[1] else None,
            None)


def adjoint_euler_backward(ctx, grad):
    return grad, grad


def adjoint_midpoint_backward(ctx, grad):
    return grad, grad, grad


def chi_prior_setup(ctx, inputs, output):
    x, weight = inputs
    ctx.weight = weight
    ctx.save_for_backward(x, output[0])
    ctx.set_materialize_grads(False)  # unused outputs arrive as None: their terms are skipped


def chi_prior_backward(ctx, g_sq, g_value, g_grad):
    """x: [B, D]. With c = weight (1 - (D-1)/sq), the outputs are sq, value and grad = c x:
        d sq/dx = 2x,   d value/dx = c x,
        grad's VJP with cotangent u (the prior's Hessian-vector product):
            c u + 2 weight (D-1) / sq^2 <u, x> x.
    The grad output is differentiable like its twin in _reference (so backends agree, and
    torch.compile / opcheck can trace every output); formed in sq's dtype (fp32 for fp16/bf16)."""
    x, sq = ctx.saved_tensors
    w, d = ctx.weight, x.shape[1]
    xf = x.to(sq.dtype)
    c = w * (1 - (d - 1) / sq)  # [B]
    coef = torch.zeros_like(sq)  # gx = coef[:, None] * x (+ c u)
    if g_sq is not None:
        coef = coef + 2 * g_sq
    if g_value is not None:
        coef = coef + g_value * c
    gx = None
    if g_grad is not None:
        u = g_grad.to(sq.dtype)
        coef = coef + (2 * w * (d - 1)) / (sq * sq) * (u * xf).sum(1)
        gx = c[:, None] * u
    out = coef[:, None] * xf
    if gx is not None:
        out = out + gx
    return out.to(x.dtype), None


def lbfgs_direction_backward(ctx, grad):
    raise RuntimeError(
        "dflow_fast::lbfgs_direction is not differentiable (the optimizer computes search "
        "directions from detached gradients and histories); detach its inputs, or use "
        "dflow_fast._reference.lbfgs_direction to differentiate through the two-loop recursion.")


def no_setup(ctx, inputs, output):
    pass
