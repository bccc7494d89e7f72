"""PyTorch reference twins of every fused op (docs/design.md section 4).

The solver's state algebra and the optimizer's per-sample reductions, written with plain torch
ops. They are the ``"torch"`` backend and the oracle of the parity tests of the C++, CUDA and
Triton kernels (``tests/ops/test_parity.py``). Low-precision inputs (fp16/bf16) are computed in fp32
and cast back, as the kernels do.

Shapes: ``x, v, a, w*: [B, *S]`` (one shape and dtype per call); ``g: [B, D]``;
``S, Y: [B, m, D]``; ``rho: [B, m]``; ``gamma: [B]``.
"""
from __future__ import annotations

import torch
from torch import Tensor

_LOW = (torch.float16, torch.bfloat16)


def _up(t: Tensor) -> Tensor:
    return t.float() if t.dtype in _LOW else t


def axpy(x: Tensor, v: Tensor, h: float) -> Tensor:
    """``x + h * v``: the Euler update and both midpoint stages (``h/2`` then ``h``)."""
    if x.dtype in _LOW:
        return (_up(x) + h * _up(v)).to(x.dtype)
    return torch.add(x, v, alpha=h)


def adjoint_euler(a: Tensor, w: Tensor) -> Tensor:
    """Euler adjoint accumulation ``a_prev = a + w`` with ``w = vjp(t, x, h a)``."""
    return (_up(a) + _up(w)).to(a.dtype)


def adjoint_midpoint(a: Tensor, w2: Tensor, w1: Tensor) -> Tensor:
    """Midpoint adjoint accumulation ``a_prev = a + w2 + w1`` (docs/design.md section 2)."""
    return (_up(a) + _up(w2) + _up(w1)).to(a.dtype)


def chi_prior(x: Tensor, weight: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample squared norms and the χ_d prior's value and gradient, x: [B, D].

    Returns ``(sq [B], value [B], grad [B, D])`` with ``sq = ||x||^2``,
    ``value = weight * (0.5 sq - 0.5 (D - 1) log sq)``, ``grad = weight * (1 - (D - 1) / sq) x``.
    sq and value are fp32 for fp16/bf16 inputs; grad has x's dtype.
    """
    xf = _up(x)
    d = x.shape[1]
    sq = (xf * xf).sum(1)
    value = weight * (0.5 * sq - 0.5 * (d - 1) * torch.log(sq))
    grad = (weight * (1.0 - (d - 1) / sq))[:, None] * xf
    return sq, value, grad.to(x.dtype)


def lbfgs_direction(g: Tensor, S: Tensor, Y: Tensor, rho: Tensor, gamma: Tensor) -> Tensor:
    """Search directions ``d = -H g`` of the batched L-BFGS two-loop recursion
    (Nocedal & Wright, Alg. 7.4).

    Args:
        g: [B, D] gradients.
        S, Y: [B, m, D] step and gradient-change histories, oldest first, newest at index m-1;
            empty slots are zero with ``rho = 0``, which makes them exact no-ops.
        rho: [B, m] ``1 / <y, s>`` per slot.
        gamma: [B] initial inverse-Hessian scale ``<s, y> / <y, y>`` of the newest pair.
    Returns:
        d: [B, D]
    """
    m = S.shape[1]
    q = g.neg()
    alpha = torch.zeros_like(rho)
    for j in range(m - 1, -1, -1):
        alpha[:, j] = rho[:, j] * (S[:, j] * q).sum(-1)
        q = q - alpha[:, j, None] * Y[:, j]
    r = q * gamma[:, None]
    for j in range(m):
        beta = rho[:, j] * (Y[:, j] * r).sum(-1)
        r = r + (alpha[:, j] - beta)[:, None] * S[:, j]
    return r


# ---- reversible solvers (docs/design.md section 2) ---------------------------------------------------
# One fused update per velocity evaluation: what a kernel does in one pass over memory. The same
# op serves the forward sweep and the algebraic inverse (the inverse is the forward with negated
# step sizes), so a compiled backend implements each formula once.

def heun_predict(y: Tensor, yhat: Tensor, f: Tensor, h: float) -> Tensor:
    """Reversible Heun's first prediction ``2 y - yhat + h f`` (all ``[B, *S]``).

    Forward: ``yhat_{k+1}`` from ``(y_k, yhat_k, f_k = u(t_k, yhat_k))`` with ``h = h_k``.
    Inverse: ``yhat_{k-1}`` from ``(y_k, yhat_k, f_k)`` with ``h = -h_{k-1}``.
    """
    if y.dtype in _LOW:
        return (2 * _up(y) - _up(yhat) + h * _up(f)).to(y.dtype)
    return torch.add(2 * y - yhat, f, alpha=h)


def heun_step(y: Tensor, yhat: Tensor, f: Tensor, fnext: Tensor, h: float,
              hnext: float) -> tuple[Tensor, Tensor]:
    """Reversible Heun after the evaluation ``fnext = u(t', yhat)``: finish ``y`` and predict the
    next evaluation point in one pass (all ``[B, *S]``)::

        y'     = y + (h / 2) (f + fnext)
        yhat'' = 2 y' - yhat + hnext fnext

    Forward step n: ``(y_{n-1}, yhat_n, f_{n-1}, f_n, h_{n-1}, h_n) -> (y_n, yhat_{n+1})``.
    Inverse: ``(y_n, yhat_{n-1}, f_n, f_{n-1}, -h_{n-1}, -h_{n-2}) -> (y_{n-1}, yhat_{n-2})``.
    At the last step ``hnext = 0`` and the second output is unused.
    """
    if y.dtype in _LOW:
        y1 = _up(y) + (0.5 * h) * (_up(f) + _up(fnext))
        return y1.to(y.dtype), (2 * y1 - _up(yhat) + hnext * _up(fnext)).to(y.dtype)
    y1 = y + (0.5 * h) * (f + fnext)
    return y1, torch.add(2 * y1 - yhat, fnext, alpha=hnext)


def heun_adjoint(a_y: Tensor, a_yhat: Tensor, w: Tensor, h: float,
                 hnext: float) -> tuple[Tensor, Tensor, Tensor]:
    """Reversible Heun's adjoint through step k (all ``[B, *S]``).

    ``a_y, a_yhat``: cotangents of ``y_{k+1}, yhat_{k+1}``; ``w = vjp(t_{k+1}, yhat_{k+1}, g)``
    with ``g`` the cotangent of ``f_{k+1}``; ``h = h_k``, ``hnext = h_{k-1}`` (0 at the first
    step). With ``c = a_yhat + w``, returns the cotangents of ``y_k``, ``yhat_k`` and the next
    VJP's cotangent ``g_k = a_f_k + (hnext / 2) a_y_k``::

        (a_y + 2 c,   -c,   (h/2) a_y + h c + (hnext/2) (a_y + 2 c))
    """
    ay, ayh, wf = _up(a_y), _up(a_yhat), _up(w)
    c = ayh + wf
    ay1 = ay + 2 * c
    g = (0.5 * h) * ay + h * c + (0.5 * hnext) * ay1
    return ay1.to(a_y.dtype), (-c).to(a_y.dtype), g.to(a_y.dtype)


def coupled_forward(y: Tensor, z: Tensor, v: Tensor, lam: float, h: float) -> Tensor:
    """Coupled reversible RK: ``y' = lam y + (1 - lam) z + h v`` with ``h v = Psi_h(t, z)`` the base
    step's increment (``v`` its last-stage velocity). All ``[B, *S]``."""
    if y.dtype in _LOW:
        return (lam * _up(y) + (1 - lam) * _up(z) + h * _up(v)).to(y.dtype)
    return torch.add(lam * y + (1 - lam) * z, v, alpha=h)


def coupled_inverse(y1: Tensor, z: Tensor, v: Tensor, lam: float, h: float) -> Tensor:
    """Inverse of :func:`coupled_forward`: ``y = (y1 - (1 - lam) z - h v) / lam``, with ``z`` the
    already reconstructed ``z_k`` and ``v`` the base step's last-stage velocity at it."""
    if y1.dtype in _LOW:
        return ((_up(y1) - (1 - lam) * _up(z) - h * _up(v)) / lam).to(y1.dtype)
    return (y1 - (1 - lam) * z - h * v) / lam


def coupled_adjoint(a_z: Tensor, b: Tensor, w: Tensor, lam: float,
                    h: float) -> tuple[Tensor, Tensor]:
    """Coupled reversible RK's adjoint through step k (all ``[B, *S]``).

    ``a_z``: cotangent of ``z_{k+1}``; ``b``: total cotangent of ``y_{k+1}`` (its own plus what
    ``z_{k+1}`` pulls back through the backward base step); ``w = vjp`` of the forward base step's
    last-stage velocity at ``z_k`` with cotangent ``b``. Returns the cotangents of ``y_k, z_k``::

        (lam b,   a_z + (1 - lam) b + h w)
    """
    bf = _up(b)
    return ((lam * bf).to(b.dtype),
            (_up(a_z) + (1 - lam) * bf + h * _up(w)).to(b.dtype))
