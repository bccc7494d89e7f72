"""Autograd formulas of the fused ops, shared by every compiled backend (the C++/CUDA ops in
``dflow_fast.ops.ext`` and the Triton ops in ``dflow_fast.kernels``) so that all backends
differentiate identically, like their twins in ``dflow_fast.ops.twins``.

Backward formulas are plain torch ops, so they are themselves differentiable (double backward).
lbfgs_direction alone has none: its registered backward raises a clear error. The reversible
solvers' updates (heun_*, coupled_*) share one setup (:func:`scalars_setup`).
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
    The grad output is differentiable like its twin in ops.twins (so backends agree, and
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
        "dflow_fast.ops.twins.lbfgs_direction to differentiate through the two-loop recursion.")


def no_setup(ctx, inputs, output):
    pass


# ---- reversible solvers' state updates -------------------------------------------------------
# Each is linear in its tensor inputs with scalar coefficients, so every input's gradient is a
# fixed linear combination of the output cotangents. Multi-output ops skip None cotangents (unused
# outputs, e.g. heun_step's prediction at the last step) instead of materializing zeros. Formed in
# fp32 for fp16/bf16 cotangents (one rounding, like the kernels), in plain torch ops so that they
# are differentiable again.

_LOW = (torch.float16, torch.bfloat16)


def _combine(dtype, *terms):
    """sum of ``coef * t`` over ``(coef, t)`` pairs whose t is not None, in fp32 for fp16/bf16;
    None when every t is None (autograd reads that as a zero gradient)."""
    out = None
    for coef, t in terms:
        if t is None:
            continue
        t = t.float() if t.dtype in _LOW else t
        term = t if coef == 1 else t * coef
        out = term if out is None else out + term
    return None if out is None else out.to(dtype)


def _grads(ctx, *grads):
    """The input gradients, None where the input needs none; scalar inputs get None."""
    need = ctx.needs_input_grad
    return (tuple(g if n else None for g, n in zip(grads, need))
            + (None,) * (len(need) - len(grads)))


def scalars_setup(ctx, inputs, output):
    """Keeps the float arguments (every one after the tensors) and the dtype of the outputs."""
    ctx.scalars = tuple(a for a in inputs if not isinstance(a, torch.Tensor))
    ctx.dtype = inputs[0].dtype
    ctx.set_materialize_grads(False)


def heun_predict_backward(ctx, g):
    # 2 y - yhat + h f
    h, = ctx.scalars
    dt = ctx.dtype
    return _grads(ctx, _combine(dt, (2, g)), _combine(dt, (-1, g)), _combine(dt, (h, g)))


def heun_step_backward(ctx, g1, g2):
    # y' = y + (h/2)(f + fnext);  yhat'' = 2 y' - yhat + hnext fnext.  G: total cotangent of y',
    # kept in fp32 for fp16/bf16 (rounding it before scaling it would round f's gradients twice).
    h, hnext = ctx.scalars
    dt = ctx.dtype
    G = _combine(_wide(dt), (1, g1), (2, g2))
    return _grads(ctx, None if G is None else G.to(dt), _combine(dt, (-1, g2)),
                  _combine(dt, (0.5 * h, G)), _combine(dt, (0.5 * h, G), (hnext, g2)))


def _wide(dtype):
    """The dtype an intermediate is kept in: fp32 for fp16/bf16, else ``dtype`` itself."""
    return torch.float32 if dtype in _LOW else dtype


def heun_adjoint_backward(ctx, g1, g2, g3):
    # With c = a_yhat + w: (a_y + 2c, -c, (h + hnext)/2 a_y + (h + hnext) c); a_yhat and w enter
    # only through c.
    h, hnext = ctx.scalars
    dt = ctx.dtype
    gc = _combine(dt, (2, g1), (-1, g2), (h + hnext, g3))
    return _grads(ctx, _combine(dt, (1, g1), (0.5 * (h + hnext), g3)), gc, gc)


def coupled_forward_backward(ctx, g):
    # lam y + (1 - lam) z + h v
    lam, h = ctx.scalars
    dt = ctx.dtype
    return _grads(ctx, _combine(dt, (lam, g)), _combine(dt, (1 - lam, g)), _combine(dt, (h, g)))


def coupled_inverse_backward(ctx, g):
    # (y1 - (1 - lam) z - h v) / lam
    lam, h = ctx.scalars
    dt = ctx.dtype
    return _grads(ctx, _combine(dt, (1 / lam, g)), _combine(dt, (-(1 - lam) / lam, g)),
                  _combine(dt, (-h / lam, g)))


def coupled_adjoint_backward(ctx, g1, g2):
    # (lam b, a_z + (1 - lam) b + h w)
    lam, h = ctx.scalars
    dt = ctx.dtype
    return _grads(ctx, _combine(dt, (1, g2)), _combine(dt, (lam, g1), (1 - lam, g2)),
                  _combine(dt, (h, g2)))
