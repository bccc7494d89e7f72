"""PyTorch reference twins of every fused op (DESIGN.md section 3).

The solver's state algebra and the optimizer's per-sample reductions, written with plain torch
ops. They are the ``"torch"`` backend and the oracle of the parity tests of the C++, CUDA and
Triton kernels (``tests/test_ops_*.py``). Low-precision inputs (fp16/bf16) are computed in fp32
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
    """Midpoint adjoint accumulation ``a_prev = a + w2 + w1`` (DESIGN.md section 2)."""
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
