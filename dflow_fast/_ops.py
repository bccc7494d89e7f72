"""The solver's state algebra: the elementwise updates the fixed-step solvers and their adjoint
sweeps perform between network evaluations.

These are the pure-PyTorch implementations. They are deliberately tiny and named so that a fused
compiled kernel (C++/CUDA/Triton, see DESIGN.md section 3) can replace each one without touching
the solver code. Shapes: every tensor argument is ``[B, *S]`` and all share one shape and dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor


def axpy(x: Tensor, v: Tensor, h: float) -> Tensor:
    """``x + h * v``: the Euler update, and both midpoint stages (``h/2`` then ``h``)."""
    return torch.add(x, v, alpha=h)


def accumulate(a: Tensor, *ws: Tensor) -> Tensor:
    """``a + sum(ws)``: the adjoint accumulation (Euler: ``a + w``; midpoint: ``a + w2 + w1``)."""
    out = a
    for w in ws:
        out = out + w
    return out


def scale(a: Tensor, h: float) -> Tensor:
    """``h * a``: the scaled cotangent fed into a vector-Jacobian product."""
    return a * h
